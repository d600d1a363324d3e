"""Tiny randomly initialised MoE models for tests, examples and benchmarks (no downloads).

    model = nnsight_moe.testing.tiny_model("qwen2_moe")

Every family's config class is filled with the same small sizes (only the attributes it has are
set), then every floating parameter and buffer is re-drawn from a seeded normal so that routing is
decisive (HF initialises some routers to zero, which makes every selection a tie).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

__all__ = ["MEDIUM", "TINY", "medium_model", "randomize_", "tiny_config", "tiny_model"]

#: Small sizes applied to whichever of these attributes a family's config has.
TINY: dict[str, Any] = {
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 64,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 48,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "num_experts": 8,
    "num_local_experts": 8,
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "n_shared_experts": 1,
    "n_group": 2,
    "topk_group": 1,
    "first_k_dense_replace": 1,
    "max_position_embeddings": 128,
    "q_lora_rank": 32,
    "kv_lora_rank": 16,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 16,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

#: Per-family extras on top of TINY (what makes the tiny model exercise the family's routing).
FAMILY_EXTRAS: dict[str, dict[str, Any]] = {
    "deepseek_v2": {"topk_method": "group_limited_greedy", "routed_scaling_factor": 1.5, "num_key_value_heads": 4},
    "deepseek_v3": {"routed_scaling_factor": 2.5, "norm_topk_prob": True, "head_dim": 8, "num_key_value_heads": 4},
    "olmoe": {"norm_topk_prob": False},
    "qwen3_moe": {"norm_topk_prob": True},
    "qwen2_moe": {"norm_topk_prob": False},
    "phimoe": {"router_jitter_noise": 0.01},
    "flex_olmo": {"num_hidden_layers": 2},  # post-norm residual grows: 3 layers exceed the 1e-5 atol
    "glm4_moe_lite": {"head_dim": 8, "num_key_value_heads": 4},
    "deepseek_v32": {"head_dim": 8, "num_key_value_heads": 4},
    "glm_moe_dsa": {"head_dim": 8, "num_key_value_heads": 4},
    "axk2": {"head_dim": 8, "num_key_value_heads": 4},
    "cohere2_moe": {"num_shared_experts": 1, "shared_expert_combination_strategy": "sum"},
    "ernie4_5_moe": {"num_experts_per_tok": 4},  # the random selection bias dominates: top-4 so blocking hits
    # hybrids: at least one attention layer (an all-linear-attention stack fails in HF on a cache query);
    # linear-attention reference kernels are slow on CPU: tiny models use attention only where the family allows
    "qwen3_next": {"layer_types": ["full_attention"] * 3},
    "qwen3_5_moe_text": {"layer_types": ["full_attention"] * 3},
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 1, "expert_layer_offset": 0},
    "bailing_hybrid": {"head_dim": 8, "num_key_value_heads": 4, "layer_types": ["full_attention"] * 3},
    "kimi_linear": {"head_dim": 8, "num_key_value_heads": 4, "layer_types": ["full_attention"] * 3},
    "nemotron_h": {"layers_block_type": ["moe", "attention", "moe"]},
    "qwen4_exp_text": {
        "layer_types": ["linear_attention", "indexed_attention", "linear_attention"],
        "indexer_n_heads": 2,
        "indexer_kv_heads": 1,
        "indexer_head_dim": 16,
        "indexer_budget": 16,
        "indexer_compress_ratio": 4,
    },
}


def tiny_config(model_type: str, **overrides: Any):
    """A small config of ``model_type`` (HF ``model_type`` string), with ``overrides`` applied last.

    Only attributes the family's config has are passed, through the config's constructor so that
    derived fields (layer types, head dims, ...) follow.
    """
    default = AutoConfig.for_model(model_type)
    values = {**TINY, **FAMILY_EXTRAS.get(model_type, {}), **overrides}
    return AutoConfig.for_model(model_type, **{k: v for k, v in values.items() if hasattr(default, k)})


def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """Re-draw every floating parameter and buffer of ``model`` from N(0, std^2/fan) (in place).

    Norm weights are drawn around 1. Returns the model.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if not tensor.is_floating_point() or "inv_freq" in name or "rotary" in name:
                continue
            noise = torch.randn(tensor.shape, generator=gen, dtype=torch.float32)
            if tensor.ndim == 1 and "norm" in name:
                tensor.copy_(1.0 + 0.1 * noise)
            elif tensor.ndim == 1:
                tensor.copy_(0.1 * noise)
            else:
                fan_in = tensor.shape[-1]
                tensor.copy_(noise * (std * 5.0 / fan_in**0.5))
    return model


def tiny_model(model_type: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any) -> PreTrainedModel:
    """A tiny random causal LM of ``model_type`` in eval mode (e.g. ``tiny_model("olmoe")``)."""
    config = tiny_config(model_type, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    randomize_(model, seed=seed)
    return model.to(dtype).eval()


#: The benchmarks' medium config: OLMoE-shaped, d_model 512, 32 experts, top-8, 4 layers (for OLMoE the
#: expert width is ``intermediate_size``; families with ``moe_intermediate_size`` use 256).
MEDIUM: dict[str, Any] = {
    "hidden_size": 512,
    "intermediate_size": 1024,
    "moe_intermediate_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "num_experts": 32,
    "num_local_experts": 32,
    "num_experts_per_tok": 8,
    "vocab_size": 4096,
    "max_position_embeddings": 256,
}


def medium_model(family: str = "olmoe", seed: int = 0, **overrides: Any) -> PreTrainedModel:
    """The benchmarks' medium random model (:data:`MEDIUM`, then ``overrides``)."""
    return tiny_model(family, seed=seed, **{**MEDIUM, **overrides})
