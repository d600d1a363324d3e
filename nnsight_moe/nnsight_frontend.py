"""nnsight frontend: ``attach(lm)`` on an nnsight model makes the hook points envoys.

    lm = nnsight.LanguageModel(hf_model, tokenizer=tok)     # or nnsight.NNsight(hf_model)
    nnsight_moe.attach(lm)
    with lm.trace(ids):
        w = lm.model.layers[1].mlp.hook_topk_weights.output.save()

The hook points are :class:`~transformer_lens.hook_points.HookPoint` submodules added to each MoE
block by the core ``attach``. An nnsight envoy tree is built when the model is wrapped, so it does not
know about modules added later; this frontend mirrors each hook point as a child envoy of its block's
envoy (nnsight installs its controller on it, so ``.output`` can be saved, set, and differentiated like
any module's) and removes those envoys again on ``handle.detach()``. Nothing else of the envoy tree,
the interleaver or the model's forward is changed.
"""

from __future__ import annotations

from typing import Any

from nnsight.intervention.envoy import Envoy

from nnsight_moe.attach import FRONTENDS, AttachHandle

__all__ = ["is_nnsight_model", "expose_hook_points"]

#: Marker in an envoy's ``__dict__``: the hook point names this frontend mirrored on it.
_MIRRORED = "_nnsight_moe_mirrored"


def is_nnsight_model(model: Any) -> bool:
    """Whether ``model`` is an nnsight envoy (``NNsight``, ``LanguageModel``, ``TransformersModel``, ...)."""
    return isinstance(model, Envoy)


def _block_envoy(root: Envoy, block) -> Envoy:
    """The envoy of ``block`` in ``root``'s tree (every module of the wrapped model has one)."""
    envoy = root.interleaver.envoys.get(id(block))
    if envoy is None:
        raise RuntimeError(
            f"the nnsight model {type(root).__name__} has no envoy for MoE block {type(block).__name__}: "
            "was the model wrapped before its modules were replaced? Re-wrap it with nnsight and attach again"
        )
    return envoy


def expose_hook_points(model: Any, handle: AttachHandle) -> None:
    """Mirror every hook point of ``handle`` as an envoy of ``model`` (an nnsight model); idempotent.

    Registers the undo with ``handle.on_detach``, so ``handle.detach()`` drops the envoys before the
    core removes the hook point modules. Objects that are not nnsight models are ignored.
    """
    if not is_nnsight_model(model):
        return
    mirrored: list[tuple[Envoy, str]] = []
    for state in handle.states.values():
        envoy = _block_envoy(model, state.block)
        done = envoy.__dict__.setdefault(_MIRRORED, set())
        if state.points is not state.block:  # a loop pass container (nnsight_moe.looped): mirrored with its points
            name = state.layer.path.rsplit(".", 1)[-1]
            if name not in done:
                envoy._wrap_envoy(name, state.points)
                done.add(name)
                mirrored.append((envoy, name))
            continue
        for name in state.layer.hook_names:
            if name in done:
                continue
            envoy._wrap_envoy(name, state.points._modules[name])
            done.add(name)
            mirrored.append((envoy, name))
    if mirrored:
        handle.on_detach(lambda: _drop(mirrored))


def _drop(mirrored: list[tuple[Envoy, str]]) -> None:
    """Forget the hook point envoys mirrored by :func:`expose_hook_points`."""
    for envoy, name in mirrored:
        done = envoy.__dict__.get(_MIRRORED, set())
        if name in done and name in envoy._child_map:
            envoy._drop_envoy(name)
        done.discard(name)


FRONTENDS.append(expose_hook_points)
