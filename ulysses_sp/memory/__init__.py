"""Memory features for long sequences, each leaving the gradients as they are: activation
checkpointing (full or selective) with offload, the tiled MLP, the RMSNorm recompute; liger-kernel's
fused elementwise kernels; and the compilation of the decoder layers, which has to compose with each
of them.

Depends on core only (docs/architecture.md).
"""
