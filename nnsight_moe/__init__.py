"""nnsight-moe: MoE interpretability for TransformerLens and nnsight."""
