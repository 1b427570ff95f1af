"""Benchmarks of ulysses_sp (run as scripts; importable as a package for the tests)."""
