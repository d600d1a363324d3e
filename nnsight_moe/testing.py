"""Tiny randomly initialised MoE models for tests, examples and benchmarks (no downloads).

    model = nnsight_moe.testing.tiny_model("qwen2_moe")

Every family's config class is filled with the same small sizes (only the attributes it has are
set), then every floating parameter and buffer is re-drawn from a seeded normal so that routing is
decisive (HF initialises some routers to zero, which makes every selection a tie).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoConfig, PreTrainedModel

__all__ = ["MEDIUM", "TINY", "fixed_canvas", "medium_model", "randomize_", "tiny_config", "tiny_model"]

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
    # ERNIE-4.5-VL: [text, vision] expert widths (modality-isolated experts), top-4 as ERNIE-4.5
    "ernie4_5_vl_moe_text": {"moe_intermediate_size": [32, 32], "moe_num_experts": 8, "moe_k": 4, "moe_num_shared_experts": 1,
                             "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [3, 3, 2]}},
    # hybrids: at least one attention layer (an all-linear-attention stack fails in HF on a cache query);
    # linear-attention reference kernels are slow on CPU: tiny models use attention only where the family allows
    "qwen3_next": {"layer_types": ["full_attention"] * 3},
    "qwen3_5_moe_text": {"layer_types": ["full_attention"] * 3},
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 1, "expert_layer_offset": 0},
    "bailing_hybrid": {"head_dim": 8, "num_key_value_heads": 4, "layer_types": ["full_attention"] * 3},
    "kimi_linear": {"head_dim": 8, "num_key_value_heads": 4, "layer_types": ["full_attention"] * 3},
    "nemotron_h": {"layers_block_type": ["moe", "attention", "moe"]},
    "glm4v_moe": {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                                      "mrope_section": [2, 1, 1]}},
    "hy_v4_vl": {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}},
    "mistral4": {"num_key_value_heads": 4},
    "sarvam_mla": {"routed_scaling_factor": 2.5, "norm_topk_prob": True, "head_dim": 8, "num_key_value_heads": 4},
    "mistral_large4": {"head_dim": 8, "num_key_value_heads": 4},
    "glm5_next": {"num_key_value_heads": 4, "qk_rope_head_dim": 0, "mlp_layer_types": ["dense", "sparse", "sparse"],
                  "layer_types": ["indexed_attention"] * 3},  # the linear-attention reference kernel is slow on CPU
    "lfm2_moe": {"layer_types": ["full_attention", "conv", "full_attention"], "num_dense_layers": 1},
    "deepseek_ocr2": {"mlp_layer_types": ["dense", "sparse", "sparse"]},
    "dots3_note": {"num_key_value_heads": 4, "per_layer_config": {}, "shared_experts_intermediate_size": 48},
    "nemo_speechlm": {"moe_shared_expert_intermediate_size": 48},
    "nemotron_h_omni": {"moe_shared_expert_intermediate_size": 48, "projector_hidden_size": 64, "vision_hidden_size": 32},
    "laguna": {"moe_routed_scaling_factor": 2.5, "moe_router_logit_softcapping": 5.0},
    "minimax_m3_vl": {"shared_intermediate_size": 48},
    "step3p7": {"sliding_window": 16, "moe_router_scaling_factor": 2.0, "share_expert_dim": 48,
                "mlp_layer_types": ["dense", "sparse", "sparse"], "swiglu_limits": [0.0, 0.0, 0.5],
                "swiglu_limits_shared": [0.0, 0.0, 0.5]},
    "axk1": {"routed_scaling_factor": 2.5, "head_dim": 8, "num_key_value_heads": 4},
    "muse_spark": {"moe_hidden_size": 32, "routed_scaling_factor": 2.0},
    "beam": {"routed_scaling_factor": 2.5, "mlp_layer_types": ["dense", "sparse", "sparse"]},
    "granitemoeshared": {"shared_intermediate_size": 48},
    "granitemoehybrid": {"shared_intermediate_size": 48, "position_embedding_type": "rope", "layer_types": ["linear_attention", "full_attention", "full_attention"],
                         "mamba_n_heads": 4, "mamba_d_head": 32, "mamba_d_state": 16, "mamba_chunk_size": 16},
    # DeepSeek-V4: one hash-routed layer first (as the real model), a small indexer
    "deepseek_v4": {"mlp_layer_types": ["hash_moe", "moe", "moe"], "index_n_heads": 2, "index_head_dim": 16,
                    "index_topk": 4},
    # DBRX keeps its MoE sizes in ffn_config (top-2 of 8 as the other families; DBRX's default is top-1 of 4).
    # transformers 5.24 quirks: d_model by name (hidden_size reaches ffn_config only so), and its attention reads
    # attn_config.rope_theta (not a DbrxAttentionConfig field) and clamps with clip_qkv (None fails): real
    # checkpoints set both (DBRX-Instruct: 500000, 8)
    "dbrx": {"d_model": 64, "ffn_config": {"ffn_hidden_size": 32, "moe_num_experts": 8, "moe_top_k": 2},
             "attn_config": {"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0}},
    # LongCat-Flash: 8 real + 2 zero-compute identity experts, MLA sizes as DeepSeek's
    "longcat_flash": {"zero_expert_num": 2, "expert_ffn_hidden_size": 32, "head_dim": 8, "num_key_value_heads": 4,
                      "num_hidden_layers": 4},  # 2 decoder layers (each holds two attention + MLP sub-layers)
    # Llama 4: layer 0 dense (its own MLP width), 1 and 2 MoE; no chunked attention
    "llama4_text": {"moe_layers": [1, 2], "intermediate_size_mlp": 64, "attention_chunk_size": None},
    # Gemma-4: MoE on every decoder layer (router + experts beside the dense MLP), small per-layer inputs
    "gemma4_text": {"enable_moe_block": True, "top_k_experts": 2, "hidden_size_per_layer_input": 16},
    # Qwen3-Omni-MoE: the talker reads the thinker's hidden states (thinker_hidden_size) at accept_hidden_layer
    # transformers 5.24: the talker's MoE block reads shared_expert_intermediate_size, which its config lacks
    "qwen3_omni_moe_talker_text": {"shared_expert_intermediate_size": 48},
    # the thinker's rope index (padded batches) reads vision_start_token_id, absent from its config class: an id
    # outside the tiny vocabulary, so no text token starts a vision span
    "qwen3_omni_moe_thinker": {"vision_start_token_id": 1000},
    "qwen3_omni_moe_talker": {"thinker_hidden_size": 64, "accept_hidden_layer": 1, "num_code_groups": 4,
                              "spatial_merge_size": 2},  # read by its modeling, absent from its config class
    # Inkling-2-Loop: layers 1 and 2 looped, three passes (8 layout layers: 0, 1, 2, 1, 2, 1, 2, 3)
    "inkling2_loop_text": {"num_hidden_layers": 4, "n_layers_per_attn_res_block": 1, "loop_layer_index_start": 1,
                           "loop_layer_index_end": 3, "loop_num_passes": 3, "loop_gate_rank": 16,
                           "unpadded_vocab_size": 128},
    # DiffusionGemma: Gemma-4 MoE layers in both stacks (untied: TOP_EXTRAS)
    "diffusion_gemma_text": {"top_k_experts": 2},
    # Inkling: two shared experts (one gamma each, normalised with the routed weights), layer 0 dense, small
    # sliding-window attention (its own head sizes) and relative-position bias
    "inkling_text": {"n_shared_experts": 2, "mlp_layer_types": ["dense", "sparse", "sparse"], "swa_num_attention_heads": 4,
                     "swa_num_key_value_heads": 2, "swa_head_dim": 16, "d_rel": 4, "rel_extent": 16},
    # ZAYA1: top-1 only (its config refuses more), a small router MLP
    "zaya": {"num_experts_per_tok": 1, "router_hidden_size": 32},
    "qwen4_exp_text": {
        "layer_types": ["linear_attention", "indexed_attention", "linear_attention"],
        "indexer_n_heads": 2,
        "indexer_kv_heads": 1,
        "indexer_head_dim": 16,
        "indexer_budget": 16,
        "indexer_compress_ratio": 4,
    },
}


#: Per-family extras for the top-level config of a multimodal family, also where its text config has the same
#: field (FAMILY_EXTRAS of the model type go to the text config then). DiffusionGemma: untied stacks
#: (``tie_word_embeddings=False`` undoes every tie, the encoder-decoder layer ties included), so that each
#: stack's experts are its own weights and zeroing them is blocking that stack's layer.
TOP_EXTRAS: dict[str, dict[str, Any]] = {"diffusion_gemma": {"tie_word_embeddings": False}}


#: Sizes for the non-text towers of multimodal families (vision / audio encoders): built, never run by
#: the tests (text-only input), so only as small as construction allows.
TOWER: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "depth": 1,
    "num_attention_heads": 2,
    "num_heads": 2,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "out_hidden_size": TINY["hidden_size"],
    "projection_intermediate_size": 64,
    "moe_intermediate_size": 32,
    "num_local_experts": 4,
    "num_experts_per_tok": 2,
    "adapter_in_dim": 32,
    "adapter_input_size": 32,
    "adapter_out_dim": TINY["hidden_size"],
    "audio_hidden_size": 32,
    "per_layer_config": {},
}


#: Per-sub-config extras on top of TOWER, keyed by the sub-config's model type (towers with per-stage lists).
TOWER_EXTRAS: dict[str, dict[str, Any]] = {
    "muse_spark_audio": {"patch_sizes": [16], "hidden_sizes": [32], "depths": [1]},
    "qwen3_omni_moe_code2wav": {"decoder_dim": 32, "codebook_size": 64},
    "inkling_vision": {"n_layers": 2, "patch_size": 4, "temporal_patch_size": 2},  # its layer widths follow the patch
    "qwen3_omni_moe_audio_encoder": {"encoder_layers": 1, "encoder_attention_heads": 2, "encoder_ffn_dim": 64,
                                     "d_model": 32, "output_dim": TINY["hidden_size"], "downsample_hidden_size": 16},
}


def tiny_config(model_type: str, **overrides: Any):
    """A small config of ``model_type`` (HF ``model_type`` string), with ``overrides`` applied last.

    Only attributes the family's config has are passed, through the config's constructor so that
    derived fields (layer types, head dims, ...) follow. A multimodal config (one with a
    ``text_config``) gets a tiny text config (TINY, the family extras, ``overrides``) and tiny
    :data:`TOWER` sizes for its other sub-configs.
    """
    default = AutoConfig.for_model(model_type)
    values = {**TINY, **FAMILY_EXTRAS.get(model_type, {}), **overrides}
    sub_configs = getattr(default, "sub_configs", None) or {}
    if any(name in sub_configs for name in COMPOSITE_SUB_CONFIGS):  # Qwen3-Omni-MoE: thinker + talker (+ code2wav)
        subs = {name: _composite(getattr(default, name), overrides) if name in COMPOSITE_SUB_CONFIGS
                else _shrunk(getattr(default, name), {**TOWER, **TOWER_EXTRAS.get(  # untyped: keyed <model_type>_<name>
                    getattr(default, name).model_type or f"{model_type}_{name.removesuffix('_config')}", {})})
                for name in sub_configs if getattr(default, name, None) is not None}
        top = {k: v for k, v in values.items() if _has(default, k) and k not in sub_configs}
        return AutoConfig.for_model(model_type, **subs, **top)
    if "text_config" not in sub_configs:
        return AutoConfig.for_model(model_type, **{k: v for k, v in values.items() if _has(default, k)})
    text_type = getattr(default.text_config, "model_type", "")
    text = {**TINY, **FAMILY_EXTRAS.get(text_type, {}), **FAMILY_EXTRAS.get(model_type, {}), **overrides}
    subs = {name: _shrunk(getattr(default, name), text if name == "text_config" else
                          {**TOWER, **TOWER_EXTRAS.get(getattr(getattr(default, name), "model_type", ""), {})})
            for name in sub_configs if getattr(default, name, None) is not None}
    text_fields = default.text_config.to_dict()
    extras = {k: v for k, v in FAMILY_EXTRAS.get(model_type, {}).items() if k not in text_fields}
    extras.update(TOP_EXTRAS.get(model_type, {}))
    top = {k: v for k, v in {**TINY, **extras, **overrides}.items() if _has(default, k) and k not in sub_configs}
    return AutoConfig.for_model(model_type, **subs, **top)


#: Sub-configs that are themselves multimodal models with a text stack of their own (Qwen3-Omni-MoE's
#: ``thinker_config`` and ``talker_config``, each holding a MoE ``text_config``): each is shrunk as a
#: multimodal config (:func:`_composite`), its other sub-configs (towers, the talker's code predictor, the
#: code-to-wave decoder) to :data:`TOWER`.
COMPOSITE_SUB_CONFIGS = ("thinker_config", "talker_config")


def _composite(config, overrides: dict[str, Any]):
    """A new ``type(config)`` of a nested multimodal sub-config: its ``text_config`` gets TINY, the family
    extras of the text model type and ``overrides``; its own fields TINY and the extras of its model type
    (keyed by ``config.model_type``, e.g. ``qwen3_omni_moe_thinker``, or by the text type's stem + ``_talker``
    where the sub-config has none: :data:`FAMILY_EXTRAS` ``qwen3_omni_moe_talker``); its other sub-configs TOWER."""
    text_type = getattr(config.text_config, "model_type", "")
    own_type = config.model_type or text_type.removesuffix("_text")
    text = {**TINY, **FAMILY_EXTRAS.get(text_type, {}), **overrides}
    nested = {name: _shrunk(getattr(config, name), text if name == "text_config" else
                            {**TOWER, **TOWER_EXTRAS.get(getattr(getattr(config, name), "model_type", ""), {})})
              for name in (getattr(config, "sub_configs", None) or {}) if getattr(config, name, None) is not None}
    for name, value in FAMILY_EXTRAS.get(text_type, {}).items():  # read by the modeling, absent from the config
        if "text_config" in nested and not hasattr(nested["text_config"], name):  # class (talker's shared width)
            setattr(nested["text_config"], name, value)
    fields = config.to_dict()
    own = {**TINY, **FAMILY_EXTRAS.get(own_type, {})}
    kept = {k: v for k, v in fields.items() if not isinstance(v, (list, dict)) and k not in _NOT_INIT and k not in nested}
    out = type(config)(**{**kept, **{k: v for k, v in own.items() if k in fields and k not in nested}, **nested})
    for name, value in FAMILY_EXTRAS.get(own_type, {}).items():  # read by the modeling, absent from the config class
        if not hasattr(out, name):
            setattr(out, name, value)
    return out


def _has(config, name: str) -> bool:
    """Whether ``config`` has the attribute ``name`` (a per-layer attribute of a heterogeneous config, which
    refuses a global read, counts as present: Gemma-4's ``head_dim``)."""
    try:
        return hasattr(config, name)
    except Exception:  # transformers' AmbiguousGlobalPerLayerAttributeError
        return True


def _shrunk(config, sizes: dict[str, Any]):
    """A new ``type(config)`` with ``sizes`` (the fields it has), its own sub-configs shrunk to :data:`TOWER`.

    ``config``'s scalar values are kept (its parent may have set some); its list and dict values (per-layer
    types, rope parameters, ...) are left to the constructor, so they follow the new sizes.
    """
    fields = config.to_dict()
    nested = {name: _shrunk(getattr(config, name), TOWER)
              for name in (getattr(config, "sub_configs", None) or {}) if getattr(config, name, None) is not None}
    kept = {k: v for k, v in fields.items() if not isinstance(v, (list, dict)) and k not in _NOT_INIT and k not in nested}
    return type(config)(**{**kept, **{k: v for k, v in sizes.items() if k in fields}, **nested})


_NOT_INIT = {"model_type", "transformers_version", "architectures", "_name_or_path", "dtype"}


def _model_class(config):
    """The HF class a tiny model of ``config`` is built from: the causal LM (of the config, else of its
    text config), else the image-text-to-text model, else the token classifier (bidirectional MoE). A
    config with a ``thinker_config`` (Qwen3-Omni-MoE, whose full model has no forward, only ``generate``)
    builds its thinker, the model that runs text (build the full model from :func:`tiny_config`)."""
    from transformers.models.auto import modeling_auto as auto

    thinker = getattr(config, "thinker_config", None)
    if thinker is not None:  # Qwen3-Omni-MoE: the full model only generates; its text forward is the thinker's
        return _model_class(thinker)
    text = config.get_text_config()
    causal = auto.MODEL_FOR_CAUSAL_LM_MAPPING
    if text is not config and type(text) in causal and causal.get(type(config), None) is causal[type(text)]:
        return causal[type(text)], text  # one causal-LM class for both (dots3.note): it runs on the text config
    for mapping, cfg in ((auto.MODEL_FOR_CAUSAL_LM_MAPPING, config), (auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING, config),
                         (auto.MODEL_FOR_MULTIMODAL_LM_MAPPING, config), (auto.MODEL_FOR_CAUSAL_LM_MAPPING, text),
                         (auto.MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING, config)):
        if type(cfg) in mapping:
            return mapping[type(cfg)], cfg
    raise ValueError(f"no causal LM, image-text-to-text or token-classification class for {config.model_type!r}")


def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """Re-draw every floating parameter and buffer of ``model`` from N(0, std^2/fan) (in place).

    Norm weights are drawn around 1; a hash router's ``tid2eid`` table gets k distinct random experts per
    token id; Zaya's ``balancing_biases`` (added to probabilities) are drawn small; 0-d tensors (constants
    such as an embedding scale) are kept. Returns
    the model.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith("tid2eid"):  # a hash router's token -> experts table: k distinct experts per token
                n_experts = int(getattr(model.get_submodule(name.rsplit(".", 1)[0]), "num_experts", tensor.max() + 1))
                table = torch.rand(tensor.shape[0], n_experts, generator=gen).argsort(dim=-1)[:, : tensor.shape[1]]
                tensor.copy_(table)
                continue
            if not tensor.is_floating_point() or tensor.ndim == 0 or "inv_freq" in name or "rotary" in name:
                continue
            noise = torch.randn(tensor.shape, generator=gen, dtype=torch.float32)
            if name.endswith("balancing_biases"):  # Zaya's selection-only bias is added to probabilities (~1/E):
                tensor.copy_(0.01 * noise)  # kept small, so the router's probabilities decide the selection
            elif tensor.ndim == 1 and "norm" in name:
                tensor.copy_(1.0 + 0.1 * noise)
            elif tensor.ndim == 1:
                tensor.copy_(0.1 * noise)
            else:
                fan_in = tensor.shape[-1]
                tensor.copy_(noise * (std * 5.0 / fan_in**0.5))
    return model


def tiny_model(model_type: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any) -> PreTrainedModel:
    """A tiny random causal LM of ``model_type`` in eval mode (e.g. ``tiny_model("olmoe")``).

    The model is built natively in ``dtype`` (as ``from_pretrained(dtype=...)`` loads a checkpoint):
    modules the family keeps in float32 (``_keep_in_fp32_modules``, e.g. DeepSeek's router) stay float32.
    The random values are the same in every dtype, rounded to it.
    """
    model_class, config = _model_class(tiny_config(model_type, **overrides))
    torch.manual_seed(seed)
    model = model_class._from_config(config, dtype=dtype)
    randomize_(model, seed=seed)
    if getattr(config, "model_type", None) == "diffusion_gemma":
        model.register_forward_pre_hook(fixed_canvas, with_kwargs=True)
    return model.eval()


def fixed_canvas(model: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Forward pre-hook of tiny DiffusionGemma models: a call without ``decoder_input_ids`` gets a fixed canvas.

    DiffusionGemma's forward draws a random canvas (``torch.randint``) when none is given, so two forwards of
    one prompt differ and the HF forward is no oracle. The tiny models are given, instead, the canvas of the
    prompt's length drawn from a generator seeded with 0, the same row for every prompt of the batch (so a
    batched forward, e.g. two nnsight invokes in one trace, equals each prompt's own forward), and the logits
    are ``[batch, pos, vocab]`` like a causal LM's, so every test can compare forwards. A real model is left as
    it is: pass ``decoder_input_ids`` yourself.
    """
    if kwargs.get("decoder_input_ids") is not None:
        return args, kwargs
    ids = kwargs.get("input_ids", args[0] if args else None)
    if ids is None:
        return args, kwargs
    vocab = model.config.get_text_config().vocab_size
    row = torch.randint(0, vocab, (1, ids.shape[-1]), generator=torch.Generator().manual_seed(0))
    canvas = row.expand(*ids.shape[:-1], ids.shape[-1]).contiguous()
    return args, {**kwargs, "decoder_input_ids": canvas.to(ids.device)}


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
