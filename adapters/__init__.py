"""Family adapters: where each MoE family keeps its router, experts and shared experts."""
