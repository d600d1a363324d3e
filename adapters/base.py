"""What an adapter is: where a family keeps its MoE parts, and which routing rule it applies.

Most transformers 5 MoE families share one shape: a block with a router (``gate`` or ``router``) that
returns ``(logits, weights, indices)``, a fused experts module decorated with
``@use_experts_implementation`` (3-D ``gate_up_proj``/``down_proj``), and optionally a shared expert MLP
and a shared-expert gate. For those, an adapter is a few lines: the attribute names and a function
that builds the :class:`~nnsight_moe.routing.Routing` from the router module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from nnsight_moe.routing import Routing


@dataclass(frozen=True)
class Adapter:
    """How to find and run one MoE family.

    Args:
        name: family name shown to users (usually the HF ``model_type``).
        model_types: HF ``config.model_type`` values this adapter serves.
        routing: builds the family's routing rule from ``(block, router, config)``.
        router: attribute of the MoE block holding the router.
        experts: attribute of the MoE block holding the fused experts.
        shared: attribute of the shared expert MLP, if the family has one.
        shared_gate: attribute of the shared expert gate (a Linear to 1, passed through a sigmoid).
        routed_scale: attribute of the block holding a constant its forward multiplies the routed sum
            by (becomes :attr:`~nnsight_moe.layout.LayerLayout.routed_scale`); None for 1.
        shared_on_layer: the shared expert is an attribute of the decoder layer, a sibling of the MoE
            block, and the layer adds its output to the block's (Granite-MoE-Shared / -Hybrid ``shared_mlp``).
        shared_down: attribute of the shared expert MLP holding its down projection (an ``nn.Linear``
            whose input is ``hook_shared_acts``).
        latent_out: attribute of the block projecting the routed sum of a latent MoE back to d_model (its
            output is ``hook_latent_out``); the layer is latent when that module is not an ``nn.Identity``.
        post: attribute of the block that post-processes its sum (its input is ``hook_moe_sum``).
        own_experts: the fused experts module has its own forward, not dispatched through transformers'
            ``ExpertsInterface`` (Step-3.7): the hooks replace its output from a forward hook.
        experts_float32: the family's experts compute in float32 whatever the model's dtype and add the
            weighted outputs of a token's experts in increasing expert order into a float32 sum, cast to
            the input dtype at the end (OpenAI-Privacy-Filter's eager experts): the ``"nnsight_moe"``
            experts implementation and the remote view then do the same, so bf16 / fp16 stay bit-exact.
        router_logits: submodule of the router whose output are the raw router logits, for a router whose
            first output is not them (Gemma-4 returns its softmax probabilities: the logits are ``proj``'s);
            the router's first output is then handed back as the (float32) scores.
        moe_out: submodule of the block whose output is ``hook_moe_out``, when the block is not the MoE
            block itself (Gemma-4: the block is the decoder layer and the MoE output is the experts').
        gate_on_input: the gate weights scale each expert's input, not its output, and the router returns a
            dense ``(scores [n, E], logits)`` pair (Llama 4; see :mod:`nnsight_moe.input_gated`).
        experts_transposed: the experts' weights are stored ``[E, in, out]`` although the module has no
            ``is_transposed`` attribute (Llama 4's experts predate the experts interface).
        routing_in_block: the router returns only its logits and the block computes the weights and
            indices it hands the experts (DBRX; see :mod:`nnsight_moe.block_routed`).
        dispatch_router: the router returns a dispatch plan and the block runs parallel experts
            (JetMoE; see :mod:`nnsight_moe.dispatch_experts`); ``experts`` names the down projection.
        moe_bias: attribute of the block holding a bias its forward adds to the routed sum
            (``hook_moe_out = hook_routed_out + bias``; JetMoE).
        identity_experts: the experts module runs its own loop and includes zero-compute identity experts
            after the real ones (LongCat-Flash; see :mod:`nnsight_moe.identity_experts`).
        stacks: paths of the decoder-layer lists to hook, in execution order, for a model with several
            MoE stacks (DiffusionGemma: the prompt encoder's, then the canvas decoder's); their layers are
            numbered on in the layout (paths below the task model; on the base model, or one holding a
            single stack, the ones it has, without the ``model.`` prefix). Empty: the first layer list
            holding a block of the family.
        loop: ``loop(config) -> (start, end, passes)`` for a looped transformer (Inkling-2-Loop): layers
            ``start .. end - 1`` run ``passes`` times per forward, and each pass is a layout layer of its own
            (see :mod:`nnsight_moe.looped`). None: every layer runs once.
        recipes: why the recipes refuse this family (:mod:`nnsight_moe.recipes.runner` raises
            ``UnsupportedModelError`` with it), or None: they run on it.
    """

    name: str
    model_types: tuple[str, ...]
    routing: Callable[[nn.Module, nn.Module, Any], Routing]
    router: str = "gate"
    experts: str = "experts"
    shared: str | None = None
    shared_gate: str | None = None
    routed_scale: str | None = None
    shared_on_layer: bool = False
    shared_down: str = "down_proj"
    latent_out: str | None = None
    post: str | None = None
    own_experts: bool = False
    experts_float32: bool = False
    router_logits: str | None = None
    moe_out: str | None = None
    gate_on_input: bool = False
    experts_transposed: bool = False
    routing_in_block: bool = False
    dispatch_router: bool = False
    moe_bias: str | None = None
    identity_experts: bool = False
    stacks: tuple[str, ...] = ()
    loop: Callable[[Any], tuple[int, int, int]] | None = None
    recipes: str | None = None

    def is_block(self, module: nn.Module) -> bool:
        """Whether ``module`` is a MoE block of this family."""
        experts = getattr(module, self.experts, None)
        router = getattr(module, self.router, None)
        return isinstance(experts, nn.Module) and isinstance(router, nn.Module) and _has_fused_experts(experts)


    def expert_width(self, experts: nn.Module) -> int:
        """d_expert: the width of one expert's down-projection input."""
        transposed = getattr(experts, "is_transposed", self.experts_transposed)
        return int(experts.down_proj.shape[1] if transposed else experts.down_proj.shape[2])

    def shared_width(self, shared: nn.Module) -> int:
        """d_shared: the width of the shared expert's ``hook_shared_acts`` (its down projection's input)."""
        return int(shared.get_submodule(self.shared_down).in_features)


def _has_fused_experts(experts: nn.Module) -> bool:
    down = getattr(experts, "down_proj", None)
    return isinstance(down, torch.Tensor) and down.ndim == 3


def config_value(config: Any, *names: str, default: Any = None) -> Any:
    """First attribute of ``config`` among ``names`` that is set (families name the same thing differently)."""
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def softmax_routing(block: nn.Module, router: nn.Module, config: Any, cast_weights: bool = True) -> Routing:
    """Softmax over all experts, top-k, optional renormalisation (Qwen-MoE, OLMoE, Mixtral, ...).

    Reads ``norm_topk_prob`` from the router (or the config); Mixtral-style routers without the
    attribute always renormalise.
    """
    normalize = getattr(router, "norm_topk_prob", config_value(config, "norm_topk_prob", default=True))
    return Routing(
        n_experts=router.num_experts,
        top_k=router.top_k,
        scoring="softmax",
        normalize=bool(normalize),
        cast_weights=cast_weights,
    )
