"""The causal-LM loss on the local shard: tiled (or liger's fused) cross-entropy without full
logits, each model family's logit transform, the global token normalisation of a step.

Depends on core only (docs/architecture.md).
"""
