"""The trainer behind launch/train.py: its typed config and command line, the plan resolved before
distributed init, the run loop, engines, run checkpoints, evaluation, failure handling, presets.

An application of the library, not library API: it may import every other subpackage, and none
imports it (docs/architecture.md).
"""
