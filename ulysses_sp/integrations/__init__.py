"""SP inside other training stacks: DeepSpeed (an mpu, initialize, the config), Accelerate (the SP
size from its config, prepare_sp, train_step), the Hugging Face Trainer (SPTrainer), and the one
resolution of the SP size for every entry point.

Depends on core, loss, data and memory (docs/architecture.md).
"""
