"""MoELayout: where a model's MoE parts live and how each MoE layer routes.

A layout is found once per model (``nnsight_moe.layout(model)``) and is all the other modules need:
the module path of every MoE block, router, experts and shared expert, the sizes (E, k, d_model,
d_expert, d_shared) and the family's :class:`~nnsight_moe.routing.Routing` rule per layer.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from dataclasses import dataclass, field

from nnsight_moe.routing import Routing

__all__ = ["HOOK_NAMES", "SHARED_HOOK_NAMES", "LayerLayout", "MoELayout", "UnsupportedModelError"]

#: Hook points every MoE block gets, in the order the forward runs them.
ROUTED_HOOK_NAMES = (
    "hook_router_logits",
    "hook_router_scores",
    "hook_topk_indices",
    "hook_topk_weights",
    "hook_expert_acts",
    "hook_expert_out",
    "hook_routed_out",
)
#: Hook points of blocks with shared expert(s).
SHARED_HOOK_NAMES = ("hook_shared_acts", "hook_shared_out", "hook_shared_gate")
#: Hook points of the contract's extension for post-processed routed sums (ARCHITECTURE.md): the experts'
#: input and the routed sum's output projection of a latent MoE (Muse-Spark, Nemotron-H ``moe_latent_size``),
#: and the sum a block post-processes (A.X-K1's post-MoE norm).
LATENT_HOOK_NAMES = ("hook_latent_in", "hook_latent_out")
POST_HOOK_NAMES = ("hook_moe_sum",)
#: Hook point of the extension for routers that also weight the shared experts (Inkling's gammas [b, p, S]).
GAMMA_HOOK_NAMES = ("hook_shared_gammas",)
#: All hook point names of the contract.
HOOK_NAMES = (ROUTED_HOOK_NAMES + SHARED_HOOK_NAMES + ("hook_moe_out",) + LATENT_HOOK_NAMES + POST_HOOK_NAMES
              + GAMMA_HOOK_NAMES)


class UnsupportedModelError(ValueError):
    """The model is not a MoE model of a supported family (the message lists the supported ones)."""


@dataclass(frozen=True)
class LayerLayout:
    """One decoder layer. ``kind`` is ``"moe"`` or ``"dense"``; paths are relative to the HF model root."""

    index: int
    kind: str
    path: str
    d_model: int
    router: str | None = None
    experts: str | None = None
    shared: str | None = None
    shared_gate: str | None = None
    n_experts: int = 0
    top_k: int = 0
    d_expert: int = 0
    d_shared: int = 0
    routing: Routing | None = field(default=None, repr=False, compare=False)
    #: The block multiplies its routed sum by this constant (OpenAI-Privacy-Filter: by top_k, undoing its
    #: router's / top_k): ``hook_moe_out = routed_scale * hook_routed_out (+ gate * shared)``.
    routed_scale: float = 1.0
    #: Path of the shared expert's down projection (an ``nn.Linear``; its input is ``hook_shared_acts``).
    shared_down: str | None = None
    #: The shared expert is a sibling of the block on the decoder layer, which adds the two outputs
    #: (Granite-MoE-Shared / -Hybrid): ``hook_moe_out`` is that sum, fired when the shared expert has run.
    shared_outside: bool = False
    #: Latent MoE: the experts run in a space of this width (0: they run on d_model). The block projects
    #: its input into it (``hook_latent_in`` is the experts' input) and the routed sum back through
    #: ``latent_out`` (its output is ``hook_latent_out``, which replaces ``routed_scale * hook_routed_out``
    #: in the block's sum).
    d_latent: int = 0
    latent_out: str | None = None
    #: The block post-processes its sum with this module (A.X-K1's post-MoE RMSNorm):
    #: ``hook_moe_out = post(hook_moe_sum)``.
    post: str | None = None
    #: Module whose output are the raw router logits when the router's first output is not them (Gemma-4's
    #: ``router.proj``); None: the router's first output.
    router_logits: str | None = None
    #: Module whose output is ``hook_moe_out`` when that is not the block (Gemma-4, whose block is the decoder
    #: layer: its experts); None: the block at ``path``.
    moe_out: str | None = None
    #: The gate weights scale the selected experts' INPUTS (Llama 4): ``hook_expert_out`` is the expert's
    #: output on ``weight * x`` and ``hook_routed_out = sum over slots of hook_expert_out``.
    gate_on_input: bool = False
    #: A bias the block adds to the routed sum (JetMoE): ``hook_moe_out = hook_routed_out + <moe_bias>``.
    moe_bias: str | None = None
    #: Which visit of its decoder layer this layout layer is (a looped transformer, Inkling-2-Loop, runs its
    #: loop layers several times per forward; each pass is a layout layer of its own, in execution order).
    loop_pass: int = 0
    #: How many passes its decoder layer makes per forward (1: not looped).
    loop_passes: int = 1
    #: The MoE block's module path when ``path`` is not it: a later pass (``loop_pass >= 1``) of a looped layer
    #: keeps its hook points in a container ``<block>.pass<p>`` that ``attach`` adds to the block (``path``).
    block_path: str | None = None
    #: The router also returns one gamma per shared expert, normalised jointly with the routed weights, and
    #: the shared experts scale their activations by them (Inkling): this many shared experts; 0: none.
    #: ``hook_shared_gammas`` [b, p, shared_gammas] fires after ``hook_topk_weights``.
    shared_gammas: int = 0

    @property
    def is_moe(self) -> bool:
        return self.kind == "moe"

    @property
    def has_shared(self) -> bool:
        return self.shared is not None

    @property
    def module_path(self) -> str:
        """Path of the layer's MoE block (or dense MLP) module: ``path`` except for a later loop pass."""
        return self.block_path or self.path

    @property
    def hook_names(self) -> tuple[str, ...]:
        """The hook points this layer has (empty for dense layers)."""
        if not self.is_moe:
            return ()
        latent = self.d_latent > 0
        gammas = GAMMA_HOOK_NAMES if self.shared_gammas else ()  # fired by the router hook, after the weights
        return (ROUTED_HOOK_NAMES[:4] + gammas + LATENT_HOOK_NAMES[:latent] + ROUTED_HOOK_NAMES[4:] + LATENT_HOOK_NAMES[1:2 * latent]
                + (SHARED_HOOK_NAMES if self.has_shared else ()) + (POST_HOOK_NAMES if self.post else ()) + ("hook_moe_out",))


@dataclass(frozen=True)
class MoELayout:
    """Per-layer description of a MoE model. ``family`` is the adapter name, ``model_type`` HF's."""

    family: str
    model_type: str
    layers: tuple[LayerLayout, ...]

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def moe_layers(self) -> list[int]:
        """Indices of the MoE layers."""
        return [layer.index for layer in self.layers if layer.is_moe]

    @property
    def n_experts(self) -> int:
        """Routed experts per MoE layer (the maximum if layers differ)."""
        return max((layer.n_experts for layer in self.layers), default=0)

    @property
    def top_k(self) -> int:
        return max((layer.top_k for layer in self.layers), default=0)

    @property
    def has_shared(self) -> bool:
        return any(layer.has_shared for layer in self.layers)

    def layer(self, index: int) -> LayerLayout:
        """The layout of layer ``index``; negative indices count from the end."""
        n = len(self.layers)
        if not isinstance(index, (int, bool)) and hasattr(index, "__index__"):
            try:
                index = operator.index(index)  # numpy / torch integers (0-d integer tensors)
            except TypeError:
                pass
        if not isinstance(index, int) or isinstance(index, bool) or not -n <= index < n:
            raise IndexError(f"layer {index!r} is out of range: this model has layers 0..{n - 1}")
        return self.layers[index]

    def moe_layer(self, index: int) -> LayerLayout:
        """Like :meth:`layer`, but the layer must be a MoE layer."""
        layer = self.layer(index)
        if not layer.is_moe:
            raise ValueError(
                f"layer {index} is a dense layer, not a MoE layer; MoE layers of this model: {self.moe_layers}"
            )
        return layer

    def check_experts(self, index: int, experts: Iterable[int]) -> list[int]:
        """Validate expert ids for MoE layer ``index``; returns them as a sorted list."""
        layer = self.moe_layer(index)
        checked = []
        for e in experts:
            if isinstance(e, bool) or not isinstance(e, int) and not hasattr(e, "__index__"):
                raise TypeError(f"expert ids must be integers, got {e!r} for layer {index}")
            e = int(e)
            if not 0 <= e < layer.n_experts:
                raise IndexError(
                    f"expert {e} is out of range for layer {index}: valid experts are 0..{layer.n_experts - 1}"
                )
            checked.append(e)
        return sorted(set(checked))

    def hook_name(self, index: int, name: str) -> str:
        """Full HF/nnsight module path of a hook point, e.g. ``model.layers.1.mlp.hook_topk_weights``."""
        layer = self.moe_layer(index)
        if name not in layer.hook_names:
            raise KeyError(f"{name!r} is not a hook of layer {index}; it has {list(layer.hook_names)}")
        return f"{layer.path}.{name}"

    def __str__(self) -> str:
        lines = [f"{self.family} ({self.model_type}): {self.n_layers} layers, MoE layers {self.moe_layers}"]
        for layer in self.layers:
            if not layer.is_moe:
                lines.append(f"  {layer.index:>3} dense  {layer.path}")
                continue
            shared = f", shared d={layer.d_shared}" if layer.has_shared else ""
            shared += " (beside the block)" if layer.shared_outside else ""
            shared += f", latent d={layer.d_latent}" if layer.d_latent else ""
            shared += f", post-processed by {layer.post.rsplit('.', 1)[-1]}" if layer.post else ""
            shared += f", routed sum x{layer.routed_scale:g}" if layer.routed_scale != 1.0 else ""
            shared += f", loop pass {layer.loop_pass} of {layer.loop_passes}" if layer.loop_passes > 1 else ""
            shared += f", {layer.shared_gammas} router gamma(s)" if layer.shared_gammas else ""
            rule = layer.routing.describe() if layer.routing is not None else ""
            lines.append(
                f"  {layer.index:>3} moe    {layer.path}  E={layer.n_experts} k={layer.top_k} "
                f"d_expert={layer.d_expert}{shared}  [{rule}]"
            )
        return "\n".join(lines)
