"""TransformerLens frontend: MoE hook points in TransformerBridge workflows.

    bridge = nnsight_moe.tl.boot("allenai/OLMoE-1B-7B-0924")      # or boot(hf_model, tokenizer=...)
    # or: bridge = TransformerBridge.boot_transformers(...); nnsight_moe.attach(bridge)
    logits, cache = bridge.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_topk_weights"))
    cache["blocks.1.mlp.hook_topk_weights"]                         # [batch, pos, k]

``nnsight_moe.attach(bridge)`` instruments the Hugging Face model behind the bridge (the core puts
every hook on the HF modules behind the bridge's wrapper components) and this frontend registers each
contract hook point under its TransformerLens name ``blocks.{L}.mlp.<hook name>``:

* in the bridge's hook registry, so it is in ``bridge.hook_dict``, cached by ``run_with_cache``
  (``names_filter`` included) and editable with ``run_with_hooks``, ``hooks()`` and ``add_hook``;
* in the MoE component's own hook registry (``bridge.blocks[L].mlp.get_hooks()``), so a rebuild of
  the bridge's registry finds it again;
* with ``HookPoint.name`` set to the TransformerLens name while the bridge is attached.

``handle.detach()`` (or ``nnsight_moe.detach(bridge)``) removes them again, restores any native
entry they shadowed (TransformerLens' ``blocks.{L}.mlp.hook_router_scores``, which fires only for
blocks that return a tuple, e.g. gpt-oss) and gives the hook points back their HF names.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor, nn
from transformers import AutoTokenizer, PreTrainedModel

from nnsight_moe.attach import FRONTENDS, AttachHandle, attach
from nnsight_moe.hooks import unwrap

__all__ = [
    "REQUIRED_TRANSFORMER_LENS",
    "boot",
    "dense_experts",
    "dense_from_cache",
    "expose_hook_points",
    "is_bridge",
    "tl_hook_name",
]

#: The TransformerLens release whose TransformerBridge has the entry points this module uses.
REQUIRED_TRANSFORMER_LENS = "transformer-lens>=4.3"

#: Marker in a bridge's ``__dict__``: ``{TL name: (hook point, shadowed registry entry, component,
#: shadowed component entry, HF name)}`` for the hook points this frontend registered.
_EXPOSED = "_nnsight_moe_tl_exposed"


def _bridge_class():
    """``TransformerBridge``, or an ImportError naming the required TransformerLens version."""
    try:
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError as error:  # pragma: no cover - depends on the installed TransformerLens
        raise ImportError(
            f"nnsight_moe.tl needs {REQUIRED_TRANSFORMER_LENS} (transformer_lens.model_bridge."
            f"TransformerBridge); install it with `pip install '{REQUIRED_TRANSFORMER_LENS}'`"
        ) from error
    return TransformerBridge


def is_bridge(model: Any) -> bool:
    """Whether ``model`` is a TransformerLens ``TransformerBridge``."""
    try:
        return isinstance(model, _bridge_class())
    except ImportError:
        return False


def tl_hook_name(layer: int, name: str) -> str:
    """The TransformerLens name of a contract hook point, e.g. ``blocks.1.mlp.hook_topk_weights``."""
    return f"blocks.{layer}.mlp.{name}"


# ------------------------------------------------------------------ frontend
def _component_of(bridge: nn.Module, layer: int, block: nn.Module) -> nn.Module | None:
    """The bridge component wrapping the HF MoE ``block`` of ``layer`` (normally ``blocks.{L}.mlp``)."""
    blocks = getattr(bridge, "blocks", None)
    if blocks is None or layer >= len(blocks):
        return None
    preferred = blocks[layer]._modules.get("mlp")
    if preferred is not None and unwrap(preferred) is block:
        return preferred
    for name, module in blocks[layer].named_modules():
        if "_original_component" not in name and module is not block and unwrap(module) is block:
            return module
    return None


def expose_hook_points(model: Any, handle: AttachHandle) -> None:
    """Register every hook point of ``handle`` under its TransformerLens name on ``model`` (a bridge).

    Called by :func:`nnsight_moe.attach` for every object it is given; objects that are not a
    ``TransformerBridge`` are ignored. Idempotent: attaching again registers only what is missing.
    The undo is registered with ``handle.on_detach`` once per bridge and handle.
    """
    if not is_bridge(model):
        return
    bridge = model
    registry: dict = bridge._hook_registry
    exposed = bridge.__dict__.get(_EXPOSED)
    first = exposed is None or exposed.get("handle") is not handle
    if first:
        exposed = {"handle": handle, "hooks": {}, "supported": None}
        bridge.__dict__[_EXPOSED] = exposed
    for state in handle.states.values():
        index = state.layer.index
        component = _component_of(bridge, index, state.block)
        for name in state.layer.hook_names:
            point = state.points._modules[name]
            full = tl_hook_name(index, name)
            if registry.get(full) is point and point.name == full:
                continue
            if full not in exposed["hooks"]:
                component_registry = getattr(component, "_hook_registry", None)
                exposed["hooks"][full] = (
                    point,
                    registry.get(full),
                    component_registry,
                    None if component_registry is None else component_registry.get(name),
                    point.name,
                )
            component_registry = exposed["hooks"][full][2]
            if component_registry is not None:
                component_registry[name] = point
            registry[full] = point
            point.name = full
    driver = getattr(bridge, "_driver", None)
    supported = getattr(driver, "supported_hook_points", None)
    if isinstance(supported, frozenset) and supported:
        if exposed["supported"] is None:
            exposed["supported"] = supported
        driver.supported_hook_points = supported | frozenset(exposed["hooks"])
    if first:
        handle.on_detach(lambda: _unexpose(bridge, handle))


def _unexpose(bridge: nn.Module, handle: AttachHandle) -> None:
    """Undo :func:`expose_hook_points`: the bridge's registries as they were, HF names back."""
    exposed = bridge.__dict__.get(_EXPOSED)
    if exposed is None or exposed.get("handle") is not handle:
        return
    registry: dict = bridge._hook_registry
    for full, (point, previous, component_registry, previous_component, hf_name) in exposed["hooks"].items():
        name = full.rsplit(".", 1)[1]
        if registry.get(full) is point:
            if previous is None:
                del registry[full]
            else:
                registry[full] = previous
        if component_registry is not None and component_registry.get(name) is point:
            if previous_component is None:
                del component_registry[name]
            else:
                component_registry[name] = previous_component
        point.remove_hooks("both", including_permanent=True)
        point.name = hf_name
    if exposed["supported"] is not None:
        bridge._driver.supported_hook_points = exposed["supported"]
    del bridge.__dict__[_EXPOSED]


FRONTENDS.append(expose_hook_points)


# ---------------------------------------------------------------------- boot
def _entry_point(name: str):
    """A TransformerLens bridge entry point, or an ImportError naming the required version."""
    if name == "boot_transformers":
        import transformer_lens.model_bridge.sources.transformers  # noqa: F401  (attaches boot_transformers)

        found = getattr(_bridge_class(), "boot_transformers", None)
        where = "TransformerBridge.boot_transformers"
    else:
        try:
            from transformer_lens.model_bridge import sources
        except ImportError:  # pragma: no cover - depends on the installed TransformerLens
            sources = None
        found = getattr(sources, name, None)
        where = f"transformer_lens.model_bridge.sources.{name}"
    if not callable(found):
        try:
            from importlib.metadata import version

            installed = version("transformer-lens")
        except Exception:  # pragma: no cover
            installed = "unknown"
        raise ImportError(
            f"nnsight_moe.tl.boot needs {REQUIRED_TRANSFORMER_LENS}: the installed TransformerLens "
            f"({installed}) has no {where}. Upgrade with `pip install -U '{REQUIRED_TRANSFORMER_LENS}'`"
        )
    return found


def _architecture(model: PreTrainedModel) -> str:
    """The TransformerLens architecture name of an HF model (its ``*ForCausalLM`` class name)."""
    from transformer_lens.factories.architecture_adapter_factory import SUPPORTED_ARCHITECTURES

    candidates = list(getattr(model.config, "architectures", None) or []) + [type(model).__name__]
    for name in candidates:
        if name in SUPPORTED_ARCHITECTURES:
            return name
    raise ValueError(
        f"TransformerLens has no bridge adapter for {type(model).__name__} (config.architectures="
        f"{getattr(model.config, 'architectures', None)}); pass a model whose class is one of "
        "TransformerBridge.list_supported_models(), e.g. Qwen2MoeForCausalLM, OlmoeForCausalLM, "
        "MixtralForCausalLM, DeepseekV3ForCausalLM"
    )


def _tokenizer(tokenizer: Any) -> Any:
    if isinstance(tokenizer, (str, os.PathLike)):
        return AutoTokenizer.from_pretrained(tokenizer)
    return tokenizer


def boot(
    model_name_or_hf_model: str | os.PathLike | PreTrainedModel,
    tokenizer: Any = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    **kw: Any,
):
    """Boot a TransformerBridge through TransformerLens' public entry points and attach it.

    Args:
        model_name_or_hf_model: a hub name or local directory (booted with
            ``TransformerBridge.boot_transformers``), or an already-built Hugging Face causal LM
            (wrapped with ``transformer_lens.model_bridge.sources.build_bridge_from_module``; the
            model is modified in place, as the bridge always does).
        tokenizer: a tokenizer, or a hub name / local directory to load one from with
            ``AutoTokenizer``. For a hub name or directory, None lets TransformerLens load the
            model's own; for a built model, None gives a bridge that runs on token ids only.
        device: where to put the model (a built model is moved there; None leaves it where it is).
        dtype: model dtype (a built model is cast; None: float32 for names, unchanged for models).
        **kw: passed on to ``boot_transformers`` (e.g. ``hf_config_overrides``, ``revision``) or to
            ``build_bridge_from_module`` (e.g. ``model_name``).

    Returns:
        The attached ``TransformerBridge``: every contract hook point is in ``bridge.hook_dict`` as
        ``blocks.{L}.mlp.<hook name>``; ``nnsight_moe.handle_of(bridge)`` gives the handle.

    Raises:
        ImportError: the installed TransformerLens lacks these entry points (names the version needed).
        TypeError: ``model_name_or_hf_model`` is neither a name/path nor a Hugging Face model.
    """
    tokenizer = _tokenizer(tokenizer)
    if isinstance(model_name_or_hf_model, (str, os.PathLike)):
        boot_transformers = _entry_point("boot_transformers")
        bridge = boot_transformers(
            str(model_name_or_hf_model),
            device=device,
            dtype=torch.float32 if dtype is None else dtype,
            tokenizer=tokenizer,
            **kw,
        )
    elif isinstance(model_name_or_hf_model, PreTrainedModel):
        if is_bridge(model_name_or_hf_model):  # pragma: no cover - a bridge is not a PreTrainedModel
            raise TypeError("boot() got a TransformerBridge: call nnsight_moe.attach(bridge) instead")
        build_bridge_from_module = _entry_point("build_bridge_from_module")
        model = model_name_or_hf_model
        if device is not None or dtype is not None:
            model.to(device=device, dtype=dtype)
        kw.setdefault("model_name", getattr(model, "name_or_path", None) or type(model).__name__)
        bridge = build_bridge_from_module(
            model, _architecture(model), hf_config=model.config, tokenizer=tokenizer, **kw
        )
    else:
        kind = "a TransformerBridge (use nnsight_moe.attach(bridge))" if is_bridge(model_name_or_hf_model) else (
            type(model_name_or_hf_model).__name__
        )
        raise TypeError(
            "boot() takes a hub model name, a local model directory or a Hugging Face "
            f"PreTrainedModel, got {kind}"
        )
    attach(bridge)
    return bridge


# --------------------------------------------------------------- dense views
def dense_experts(values: Tensor, indices: Int[Tensor, "b p k"], n_experts: int) -> Tensor:
    """Scatter per-slot expert tensors [b, p, k, ...] into a dense per-expert view [b, p, E, ...].

    ``values`` is a cached sparse hook value (``hook_topk_weights`` [b, p, k], ``hook_expert_acts``
    [b, p, k, d_expert], ``hook_expert_out`` [b, p, k, d_model]) and ``indices`` the same layer's
    ``hook_topk_indices`` [b, p, k]. Entry ``[b, p, e]`` is the value of the slot that selected
    expert ``e`` (summed if a token selected it twice) and zero where ``e`` was not selected.

    Memory: the result has ``b * p * E * prod(values.shape[3:])`` elements, ``E / k`` times the
    sparse tensor (for ``hook_expert_out`` of OLMoE, 64 experts and top-8: 8x, i.e.
    ``b * p * 64 * 2048`` floats). Build it for the few layers or positions you need (slice the
    cached tensors first); caches always store the sparse form.
    """
    if not isinstance(values, Tensor) or not isinstance(indices, Tensor):
        raise TypeError(
            f"values and indices must be tensors, got {type(values).__name__} and {type(indices).__name__}"
        )
    if indices.dim() != 3 or values.dim() < 3 or values.shape[:3] != indices.shape:
        raise ValueError(
            f"values must be [b, p, k, ...] and indices [b, p, k] with the same b, p, k; got values "
            f"{tuple(values.shape)} and indices {tuple(indices.shape)}"
        )
    if indices.dtype.is_floating_point or indices.dtype == torch.bool:
        raise TypeError(f"indices must be an integer tensor (hook_topk_indices), got {indices.dtype}")
    if isinstance(n_experts, bool) or not isinstance(n_experts, int) or n_experts < 1:
        raise ValueError(f"n_experts must be a positive integer (the layer's E), got {n_experts!r}")
    if indices.numel() and not (0 <= int(indices.min()) and int(indices.max()) < n_experts):
        raise ValueError(
            f"indices must lie in 0..{n_experts - 1} for n_experts={n_experts}, got "
            f"{int(indices.min())}..{int(indices.max())}"
        )
    b, p, k = indices.shape
    rest = values.shape[3:]
    dense = values.new_zeros(b, p, n_experts, *rest)
    index = indices.to(values.device, torch.long).reshape(b, p, k, *([1] * len(rest))).expand(b, p, k, *rest)
    return dense.scatter_add_(2, index, values)


def dense_from_cache(cache: Any, layer: int, name: str = "hook_expert_out") -> Tensor:
    """:func:`dense_experts` of a cached sparse hook of ``layer`` (``cache`` from ``run_with_cache``).

    The cache must hold ``blocks.{layer}.mlp.<name>``, ``hook_topk_indices`` and ``hook_router_logits``
    (for E) of that layer; ``name`` is one of ``hook_topk_weights``, ``hook_expert_acts``,
    ``hook_expert_out``.
    """
    sparse = ("hook_topk_weights", "hook_expert_acts", "hook_expert_out")
    if name not in sparse:
        raise ValueError(f"name must be one of {sparse} (the per-slot hooks), got {name!r}")
    needed = [tl_hook_name(layer, n) for n in (name, "hook_topk_indices", "hook_router_logits")]
    missing = [n for n in needed if n not in cache]
    if missing:
        raise KeyError(f"the cache lacks {missing}: cache them with run_with_cache (names_filter) first")
    return dense_experts(cache[needed[0]], cache[needed[1]], int(cache[needed[2]].shape[-1]))
