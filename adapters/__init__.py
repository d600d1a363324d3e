"""Family adapters: where each MoE family keeps its router, experts and shared experts.

Each module in this package describes one family in a few lines (an :class:`Adapter`); ``detect``
turns a Hugging Face model into a :class:`~nnsight_moe.layout.MoELayout` with the adapter registered
for its ``config.model_type``. ``supported_families()`` lists exactly the registered families, each of
which the test suite checks for numerical equivalence with the unmodified HF forward.
"""

from __future__ import annotations

import importlib
import pkgutil

from torch import nn

from nnsight_moe.adapters.base import Adapter
from nnsight_moe.layout import LayerLayout, MoELayout, UnsupportedModelError

__all__ = ["Adapter", "adapter_for", "detect", "register", "supported_families"]

_REGISTRY: dict[str, Adapter] = {}
_DOCS: dict[str, str] = {}  # family name -> its adapter module's docstring


def register(adapter: Adapter) -> Adapter:
    """Register ``adapter`` for each of its ``model_types``."""
    for model_type in adapter.model_types:
        _REGISTRY[model_type] = adapter
    return adapter


def supported_families() -> list[str]:
    """Names of the supported MoE families (HF ``model_type`` values), sorted."""
    return sorted({adapter.name for adapter in _REGISTRY.values()})


def family_table() -> list[tuple[str, str, str]]:
    """(family, routing summary, shared experts) per supported family, from each adapter module's docstring."""
    rows = []
    for name in supported_families():
        adapter = next(a for a in _REGISTRY.values() if a.name == name)
        summary = " ".join(_DOCS.get(name, "").strip().split("\n\n")[0].split())
        shared = "no" if adapter.shared is None else ("sigmoid-gated" if adapter.shared_gate else "yes")
        rows.append((name, summary.split(": ", 1)[-1].rstrip("."), shared))
    return rows


def _text_config(model: nn.Module):
    config = getattr(model, "config", None)
    if config is None:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no `config`: pass a Hugging Face transformers model, a "
            "TransformerBridge or an nnsight model"
        )
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter for ``model``'s family, or :class:`UnsupportedModelError` listing the supported ones.

    Found by ``model_type`` (of the text config, then of the model's config), else by structure: the
    adapter registered for the transformers package whose MoE block classes the model runs (a config
    with its own ``model_type`` on DeepSeek-V3's modeling classes is served by ``deepseek_v3``).
    """
    config = _text_config(model)
    for model_type in (getattr(config, "model_type", None), getattr(model.config, "model_type", None)):
        if model_type in _REGISTRY:
            return _REGISTRY[model_type]
    adapter = _adapter_by_structure(model)
    if adapter is not None:
        return adapter
    raise UnsupportedModelError(
        f"model_type {getattr(model.config, 'model_type', None)!r} ({type(model).__name__}) is not a supported "
        f"MoE family. Supported families: {', '.join(supported_families())}"
    )


def _adapter_by_structure(model: nn.Module) -> Adapter | None:
    """The adapter of the first module of ``model`` that is a MoE block of the package defining its class."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES, model_type_to_module_name

    by_package: dict[str, list[Adapter]] = {}
    for model_type in CONFIG_MAPPING_NAMES:
        if model_type in _REGISTRY:
            by_package.setdefault(model_type_to_module_name(model_type), []).append(_REGISTRY[model_type])
    for module in model.modules():
        parts = type(module).__module__.split(".")
        if len(parts) > 3 and parts[:2] == ["transformers", "models"]:
            adapter = next((a for a in by_package.get(parts[2], []) if a.is_block(module)), None)
            if adapter is not None:
                return adapter
    return None


def _decoder_layers(model: nn.Module, adapter: Adapter) -> tuple[str, nn.ModuleList]:
    """The ModuleList of decoder layers: the first ``*layers`` list containing a block of the family."""
    for path, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and path.split(".")[-1] in ("layers", "h", "blocks"):
            if any(adapter.is_block(m) for layer in module for m in layer.modules()):
                return path, module
    raise UnsupportedModelError(
        f"no {adapter.name} MoE block found in {type(model).__name__}: is it a dense model? "
        f"Supported families: {', '.join(supported_families())}"
    )


def _stacks(model: nn.Module, adapter: Adapter) -> list[tuple[str, nn.ModuleList]]:
    """The adapter's layer lists (``Adapter.stacks``) that ``model`` has, as paths below it: on the base model
    (no ``model.`` prefix) or a model holding one stack only, the ones it holds."""
    found = []
    for path in adapter.stacks:
        for candidate in dict.fromkeys((path, path.removeprefix("model."))):
            try:
                module = model.get_submodule(candidate)
            except AttributeError:
                continue
            if isinstance(module, nn.ModuleList):
                found.append((candidate, module))
                break
    if not found:
        raise UnsupportedModelError(f"{type(model).__name__} has none of the {adapter.name} layer lists "
                                    f"{list(adapter.stacks)}; pass the model that holds them")
    return found


def detect(model: nn.Module) -> MoELayout:
    """Describe ``model`` (a Hugging Face model): its MoE and dense layers, paths and routing rules."""
    adapter = adapter_for(model)
    config = _text_config(model)
    stacks = _stacks(model, adapter) if adapter.stacks else [_decoder_layers(model, adapter)]
    d_model = int(getattr(config, "hidden_size"))
    described = []
    for layers_path, layers in stacks:  # several stacks (DiffusionGemma): numbered on, in execution order
        for number, layer in enumerate(layers):
            index = len(described)
            found = next(((name, m) for name, m in layer.named_modules() if adapter.is_block(m)), None)
            if found is None:
                mlp = next((name for name in ("mlp", "feed_forward") if hasattr(layer, name)), "")
                described.append(LayerLayout(index, "dense", f"{layers_path}.{number}" + (f".{mlp}" if mlp else ""), d_model))
                continue
            name, block = found
            path = f"{layers_path}.{number}" + (f".{name}" if name else "")  # "": the decoder layer is the block (Gemma-4)
            described.append(_moe_layer(index, path, block, adapter, config, d_model, layer, f"{layers_path}.{number}"))
    if adapter.loop is not None:
        described = _unrolled(described, *adapter.loop(config))
    return MoELayout(family=adapter.name, model_type=config.model_type, layers=tuple(described))


def _unrolled(layers: list[LayerLayout], start: int, end: int, passes: int) -> list[LayerLayout]:
    """A looped stack's layers in execution order: ``0 .. start - 1``, then layers ``start .. end - 1`` once per
    pass, then ``end ..``; renumbered. Pass 0 keeps its block's path; pass p >= 1 keeps its hook points in the
    container ``<block>.pass<p>`` (``LayerLayout.block_path`` is the block)."""
    from dataclasses import replace

    visits = [(layer, 0) for layer in layers[:start]]
    visits += [(layer, p) for p in range(passes) for layer in layers[start:end]]
    visits += [(layer, 0) for layer in layers[end:]]
    out = []
    for index, (layer, p) in enumerate(visits):
        looped = start <= layer.index < end
        if p and layer.is_moe:
            out.append(replace(layer, index=index, path=f"{layer.path}.pass{p}", block_path=layer.path,
                               loop_pass=p, loop_passes=passes))
        else:
            out.append(replace(layer, index=index, loop_pass=p, loop_passes=passes if looped else 1))
    return out


def _moe_layer(index: int, path: str, block: nn.Module, adapter: Adapter, config, d_model: int,
               layer: nn.Module, layer_path: str) -> LayerLayout:
    router = block.get_submodule(adapter.router)
    experts = block.get_submodule(adapter.experts)
    routing = adapter.routing(block, router, config)
    transposed = getattr(experts, "is_transposed", adapter.experts_transposed)
    d_expert = adapter.expert_width(experts)
    latent = adapter.latent_out is not None and not isinstance(block.get_submodule(adapter.latent_out), nn.Identity)
    d_latent = int(experts.down_proj.shape[2] if transposed else experts.down_proj.shape[1]) if latent else 0
    owner, owner_path = (layer, layer_path) if adapter.shared_on_layer else (block, path)  # where the shared MLP lives
    shared = adapter.shared if adapter.shared and getattr(owner, adapter.shared, None) is not None else None
    d_shared = 0
    if shared is not None:
        d_shared = adapter.shared_width(owner.get_submodule(shared))
    return LayerLayout(
        index=index,
        kind="moe",
        path=path,
        d_model=d_model,
        router=f"{path}.{adapter.router}",
        experts=f"{path}.{adapter.experts}",
        shared=f"{owner_path}.{shared}" if shared else None,
        shared_gate=f"{owner_path}.{adapter.shared_gate}" if shared and adapter.shared_gate else None,
        shared_down=f"{owner_path}.{shared}.{adapter.shared_down}" if shared else None,
        shared_outside=bool(shared and adapter.shared_on_layer),
        d_latent=d_latent,
        latent_out=f"{path}.{adapter.latent_out}" if latent else None,
        post=f"{path}.{adapter.post}" if adapter.post else None,
        n_experts=routing.n_experts,
        top_k=routing.top_k,
        d_expert=int(d_expert),
        d_shared=int(d_shared),
        routing=routing,
        routed_scale=float(getattr(block, adapter.routed_scale)) if adapter.routed_scale else 1.0,
        router_logits=f"{path}.{adapter.router}.{adapter.router_logits}" if adapter.router_logits else None,
        moe_out=f"{path}.{adapter.moe_out}" if adapter.moe_out else None,
        gate_on_input=adapter.gate_on_input,
        moe_bias=f"{path}.{adapter.moe_bias}" if adapter.moe_bias else None,
        shared_gammas=int(getattr(routing, "n_shared", 0)) if shared else 0,
    )


def _load_all() -> None:
    for info in pkgutil.iter_modules(__path__):
        if info.name == "base":
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        for value in vars(module).values():
            if isinstance(value, Adapter):
                register(value)
                _DOCS[value.name] = module.__doc__ or ""


_load_all()
