"""Remote view: the hook contract's quantities inside an nnsight trace on an UNMODIFIED model.

On NDIF the server runs its own copy of the model; nothing attached on the client exists there, and a
request can carry only the traced block's source, the plain values it references and functions
(shipped by source). So the view is plain data plus plain functions::

    view = nnsight_moe.remote.MoEView(lm)                 # client side: reads the layout once
    with lm.trace(ids, remote=True):                      # or remote="local", or no remote at all
        q = nnsight.save(view.layer(1))                   # {"router_scores": [b, p, E], ...}
        b = nnsight.save(view.layer(2, block=[0, 5], mode="renorm", want=("topk_weights",)))

How nnsight 0.8.1 ships a trace (``nnsight.schema.request.RequestModel.serialize``): the ``with`` block
is unparsed to source; the names it reads are pickled with nnsight's cloudpickle subclass; envoys and
the model travel as persistent ids (``Module:<path>``, ``Interleaver``) resolved against the server's
model; a function is pickled *by reference* (module + name) when its module is importable, else *by
value as source* plus the globals it reads. ``nnsight_moe`` is not installed on NDIF, so this module
and ``nnsight_moe.routing`` (whose ``rule_*`` functions the view calls) register themselves for by-value
pickling (``cloudpickle.register_pickle_by_value``) and their trace-side functions read only ``torch``
and each other: a request using the view carries their source, a ``types.SimpleNamespace``,
``functools.partial`` objects and plain dicts; no classes of ours, no hooks.

Per-expert values are RECOMPUTED from the block input and the experts' weights (the same math as the
``"nnsight_moe"`` experts implementation: gate_up, the experts' own ``_apply_gate``/``act_fn``, down,
biases, post-expert norm), not read through ``.source``: ``.source`` exposes the operations inside the
experts forward, which differ between transformers' eager, ``batched_mm`` and ``grouped_mm``
implementations (and kernels), whereas the weights and the router's ``(logits, weights, indices)``
output are the same under all of them. Edits (blocking, router edits) are made by setting the router's
output, which every implementation consumes. Router logits, top-k indices and weights are the model's
own; scores follow the family's rule; ``moe_out`` is the block's real output.
"""

from __future__ import annotations

import functools
import os
import sys
import time
import types
import warnings
from typing import Any

import cloudpickle
import torch

from nnsight_moe.attach import hf_model
from nnsight_moe.files import ResultsFileError, call_identity, digest, identity_changes, load_results, model_identity, save_results
from nnsight_moe.block_routed import dbrx_slots
from nnsight_moe.dispatch_experts import dispatch_plan, parallel_slots
from nnsight_moe.identity_experts import identity_slots
from nnsight_moe.input_gated import dense_experts, dense_scores
from nnsight_moe.layout import MoELayout
from nnsight_moe.routing import Routing, expert_order_sum, keep_top_weights, rule_scores, rule_select, rule_weights, zero_weights
from nnsight_moe.routing import sink_weights
from nnsight_moe.shared_gammas import gamma_shared, sink_logits

__all__ = ["MoEView", "RemoteBatchError", "VIEW_QUANTITIES", "moe_spec", "read_layer", "run_batches"]

#: What :func:`read_layer` can return, named like the hook points without ``hook_``.
VIEW_QUANTITIES = (
    "router_logits",
    "router_scores",
    "topk_indices",
    "topk_weights",
    "expert_acts",
    "expert_out",
    "routed_out",
    "shared_acts",
    "shared_out",
    "shared_gate",
    "moe_out",
    "latent_in",
    "latent_out",
    "moe_sum",
    "shared_gammas",
)
_MODES = ("zero", "renorm", "reroute")


# ------------------------------------------------------------ client side: plain-data spec
def _routing_spec(routing: Routing, block: torch.nn.Module, family: str) -> dict:
    """``routing.rule()`` plus ``"bias"``: the path (below the MoE block) of the selection bias, or None.

    The bias is a parameter or buffer of the router (DeepSeek, GLM, ...) or of the block itself, which
    hands it to the router as a second argument (AFMoE, HY-V3, MiniMax-M2); adapters may pass a view
    of it (ERNIE squeezes it).
    """
    if "_kind" not in type(routing).__dict__:  # a subclass of its own: its maths are not the rule_* functions'
        raise ValueError(f"{family}: the remote view does not implement the routing rule {type(routing).__name__}")
    named = dict(block.named_parameters()) | dict(block.named_buffers())
    paths = {}
    for what, tensor in (("bias", routing.bias), ("expert_scale", getattr(routing, "expert_scale", None)),
                         ("global_scale", getattr(routing, "global_scale", None))):
        paths[what] = None
        if tensor is not None:
            paths[what] = next((name for name, t in named.items() if tensor is t or tensor._base is t), None)
            if paths[what] is None:
                raise ValueError(f"{family}: the routing {what} is not a parameter or buffer of the MoE block; "
                                 "the remote view needs one")
    return {**routing.rule(), **paths}


def moe_spec(model: Any) -> dict:
    """Everything the trace-side functions need about ``model``'s MoE layers, as plain data.

    ``model`` is an nnsight model (or the HF model / TransformerBridge behind one); its weights may be
    on the meta device (a remote model that was never dispatched). Returns
    ``{"family": str, "layers": {index: {paths, sizes, routing}}}`` (str, int, float, bool, None only).
    ``router_logits`` / ``moe_out``: the modules whose outputs are the router logits and the MoE output when
    they are not the router's first output and the block's (Gemma-4); there the experts' input is read
    from the experts (``experts_input``), not from the block.
    """
    from nnsight_moe import layout as layout_of
    from nnsight_moe.adapters import adapter_for

    hf = hf_model(model)
    layout: MoELayout = layout_of(hf)
    adapter = adapter_for(hf)
    experts_float32 = bool(adapter.experts_float32)
    layers = {}
    for index in layout.moe_layers:
        info = layout.layer(index)
        shared = hf.get_submodule(info.shared) if info.shared else None
        layers[index] = {
            "block": info.module_path,
            "loop_pass": info.loop_pass,  # a later pass of a looped layer reads its modules' loop_pass-th call
            "shared_first": _shared_runs_first(hf, info) if info.shared else False,
            "shared_gated": shared is not None and hasattr(shared, "gate_proj"),
            # a shared MLP that is not gate/up/down_proj, or lives beside the block: read from the forward
            "shared_read": shared is not None and not info.shared_gammas and (info.shared_outside or not _standard_mlp(shared)),
            # Inkling: the router's fourth output are the shared experts' gammas (nnsight_moe.shared_gammas)
            "shared_gammas": info.shared_gammas,
            "shared_down": info.shared_down,
            "shared_outside": info.shared_outside,
            "d_latent": info.d_latent,
            "latent_out": info.latent_out,
            "post": info.post,
            "router": info.router,
            "experts": info.experts,
            "shared": info.shared,
            "shared_gate": info.shared_gate,
            "n_experts": info.n_experts,
            "top_k": info.top_k,
            "experts_float32": experts_float32,
            "router_logits": info.router_logits,
            "moe_out": info.moe_out,
            "experts_input": info.moe_out is not None,
            "gate_on_input": info.gate_on_input,
            "routing_in_block": bool(adapter.routing_in_block),
            "dispatch_router": bool(adapter.dispatch_router),
            # LongCat-Flash: experts from this id on are zero-compute identities
            "identity_experts": (int(hf.get_submodule(info.experts).num_routed_experts)
                                 if adapter.identity_experts else None),
            "routing": _routing_spec(info.routing, hf.get_submodule(info.module_path), layout.family),
        }
    return {"family": layout.family, "layers": layers}


#: The forwards the view recomputes a shared expert by (``down(act(gate(x)) * up(x))``, ``down(act(up(x)))``),
#: whitespace removed; any other shared MLP (clamped, fused, float32 SwiGLU, ...) is read from the forward.
_STANDARD_MLPS = ("self.down_proj(self.act_fn(self.gate_proj(x))*self.up_proj(x))",
                  "self.down_proj(self.act_fn(self.up_proj(x)))")


def _standard_mlp(shared: torch.nn.Module) -> bool:
    """Whether ``shared``'s forward is one of :data:`_STANDARD_MLPS` (read from its source)."""
    import inspect

    try:
        source = "".join(inspect.getsource(type(shared).forward).split())
    except (OSError, TypeError):
        return False
    return any(f"return{expr}" in source or f"={expr}" in source for expr in _STANDARD_MLPS)


def _shared_runs_first(hf: torch.nn.Module, info: Any) -> bool:
    """Whether the shared expert runs before the router (from the source of the module calling both).

    nnsight serves a module's output in execution order, so an edit of the shared expert's output
    must be requested before or after the router's depending on the family (Qwen2-MoE, ERNIE and
    Hunyuan call the shared expert first; DeepSeek, GLM and most others call the router first). The
    caller is the MoE block, or for a shared expert beside the block (Granite) the decoder layer,
    which calls the block (holding the router) and the shared MLP.
    """
    import inspect

    parent = info.shared.rsplit(".", 1)[0]
    if not info.router.startswith(parent + "."):
        raise ValueError(f"the router {info.router} is not below {parent}, the module calling the shared expert")
    caller = type(hf.get_submodule(parent))
    source = inspect.getsource(caller.forward)
    shared = source.find(f"self.{info.shared[len(parent) + 1:]}(")
    router = source.find(f"self.{info.router[len(parent) + 1:].split('.')[0]}(")
    if shared < 0 or router < 0:
        raise ValueError(
            f"cannot tell from {caller.__name__}.forward whether the shared expert runs before the router; "
            "the remote view needs to know to ablate it"
        )
    return shared < router


def MoEView(model: Any) -> types.SimpleNamespace:  # noqa: N802 (reads like the object it returns)
    """A remote-safe view of ``model``'s MoE layers, for use inside ``model.trace(...)``.

    Returns a ``types.SimpleNamespace`` with ``spec`` (:func:`moe_spec`), ``moe_layers`` (list of int)
    and ``layer(index, **options)``, which is :func:`read_layer` bound to ``model`` and the spec (see
    there for the options). It holds only plain data, ``functools.partial`` and functions shipped by
    source, so it travels in a remote request. Call ``view.layer`` for MoE layers in increasing order
    (nnsight runs interventions in the model's execution order).
    """
    spec = moe_spec(model)
    return types.SimpleNamespace(
        spec=spec,
        moe_layers=sorted(spec["layers"]),
        layer=functools.partial(read_layer, model, spec),
    )


# ------------------------------------------------------------ client side: resumable batch runner
class RemoteBatchError(RuntimeError):
    """A batch of :func:`run_batches` failed; finished batches are kept in ``results_path``.

    Attributes: ``batch`` (index of the failed batch), ``results_path``, ``completed`` (indices kept).
    """

    def __init__(self, message: str, batch: int, results_path: Any, completed: list[int]):
        super().__init__(message)
        self.batch, self.results_path, self.completed = batch, results_path, completed


_RESULTS_FORMAT = "nnsight_moe.run_batches/2"


def run_batches(
    model: Any,
    batches: Any,
    fn: Any,
    *,
    extras: Any = None,
    key: Any = None,
    remote: bool | str = False,
    results_path: Any = None,
    trace_kwargs: dict | None = None,
    progress: bool = True,
) -> list:
    """Run ``fn`` inside one ``model.trace(batch, remote=remote)`` per batch; resumable.

    For each batch this runs::

        with model.trace(batch, remote=remote, **trace_kwargs):
            result = nnsight.save(fn(model, batch))

    so ``fn(model, batch)`` executes where the model is (on NDIF for ``remote=True``) and only what it
    returns comes back: return small tensors (scores, ranks), not activations. After each batch the
    results so far are written to ``results_path`` (atomically); a rerun with the same batches skips
    the finished ones. A failing batch raises :class:`RemoteBatchError` naming it, with the finished
    results kept on disk.

    Args:
        model: an nnsight model (``LanguageModel`` / ``TransformersModel``; for ``remote`` one that
            NDIF hosts, keyed by its repo id).
        batches: a sequence of inputs, each anything ``model.trace`` accepts (prompts, token ids).
        fn: ``fn(model, batch) -> result`` (a dict / tuple / tensor), called inside the trace (with
            ``extras``: ``fn(model, batch, extras[i])``). For a
            remote run it is shipped by source with the globals it reads, so it may use torch,
            nnsight, transformers and plain functions (e.g. :func:`read_layer` through a
            :func:`MoEView`), not other client-only objects. Functions of ``nnsight_moe`` modules are
            registered for by-value shipping automatically (nnsight_moe is not installed on NDIF).
        extras: optional per-batch plain data (e.g. target ids, last positions), one item per batch,
            handed to ``fn`` as a third argument and part of the resume fingerprint.
        key: optional plain data describing what ``fn`` computes (its settings); part of the resume
            fingerprint (with ``fn``'s name and the arguments bound by a ``functools.partial``), so a
            results file written with other settings is refused, not reused.
        remote: ``False`` (local), ``True`` (NDIF; host and key from ``nnsight.CONFIG`` /
            ``NDIF_API_KEY``), ``"local"`` (nnsight's serialise-and-run-here simulation) or a host URL.
        results_path: file for partial and final results; None keeps nothing. It is a safetensors file
            with a JSON header (loaded without unpickling anything, so a crafted file cannot run code),
            written atomically after each batch. A rerun resumes from it only when the batches, the
            model (class, config, dtype, weights digest, or hub name and revision for a meta-device
            remote model), the function and ``key`` are the same; otherwise it raises
            :class:`~nnsight_moe.files.ResultsFileError` (a ``ValueError``) saying what differs. If
            writing fails (a full disk), a ``RuntimeWarning`` is issued and the run goes on (the write
            is retried after each batch); the returned results are complete.
        trace_kwargs: extra keyword arguments for ``model.trace``.
        progress: print one line per batch.

    Returns:
        The results, one per batch, in order (tensors moved to CPU).
    """
    import nnsight

    _check_remote(remote)
    if not hasattr(model, "trace"):
        raise TypeError(f"remote={remote!r} needs an nnsight model (e.g. nnsight.LanguageModel), got {type(model).__name__}")
    if not callable(fn):
        raise TypeError(f"fn must be a callable fn(model, batch), got {type(fn).__name__}")
    batches = list(batches)
    n = len(batches)
    if extras is not None:
        extras = list(extras)
        if len(extras) != n:
            raise ValueError(f"got {n} batches but {len(extras)} extras (one per batch)")
    fingerprints = [_fingerprint((batch, None if extras is None else extras[i])) for i, batch in enumerate(batches)]
    identity = {**model_identity(model), **call_identity(fn, key)} if results_path is not None else None
    done = _load_results(results_path, fingerprints, identity)
    unsaved = False
    _ship_by_value(fn)
    trace_kwargs = dict(trace_kwargs or {})
    if progress and done:
        print(f"[nnsight_moe] resuming from {results_path}: {len(done)}/{n} batches already done", flush=True)
    for index, batch in enumerate(batches):
        if index in done:
            continue
        start = time.perf_counter()
        result = None
        try:
            with model.trace(batch, **({"remote": remote} if remote else {}), **trace_kwargs):
                result = nnsight.save(fn(model, batch) if extras is None else fn(model, batch, extras[index]))
        except Exception as error:
            where = f"; {len(done)} finished batches are kept in {results_path}, rerun to resume" if results_path else ""
            raise RemoteBatchError(
                f"batch {index} of {n} failed ({type(error).__name__}: {error}){where}",
                index, results_path, sorted(done),
            ) from error
        done[index] = _to_cpu(result)
        unsaved = _keep_results(results_path, fingerprints, done, identity, index)
        if progress:
            print(f"[nnsight_moe] batch {index + 1}/{n} done in {time.perf_counter() - start:.1f}s", flush=True)
    if unsaved:
        _warn_unsaved(results_path)
    return [done[index] for index in range(n)]


#: Set to 1 to allow ``remote="http://..."`` to a host that is not this machine (the API key travels in clear).
ALLOW_HTTP_ENV = "NNSIGHT_MOE_ALLOW_HTTP"


def _check_remote(remote: Any) -> None:
    """Refuse a bad ``remote=``, and a plain-http host other than loopback (the NDIF API key would travel in clear).

    ``remote=True`` is checked against the configured host (``nnsight.CONFIG.API.HOST``). Plain http to
    another host needs an explicit opt-in: the environment variable ``NNSIGHT_MOE_ALLOW_HTTP=1`` (the
    CLI's ``--allow-http``).
    """
    ok = remote in (False, True, None, "local") or (
        isinstance(remote, str) and remote.startswith(("http://", "https://"))
    )
    if not ok:
        raise ValueError(
            f"remote must be False, True (NDIF), 'local' (nnsight's local simulation) or a host URL "
            f"starting with http:// or https://, got {remote!r}"
        )
    if remote is True:
        import nnsight

        _check_host(str(nnsight.CONFIG.API.HOST), "the configured NDIF host (nnsight.CONFIG.API.HOST)")
    elif isinstance(remote, str) and remote != "local":
        _check_host(remote, "remote")


def _check_host(url: str, what: str) -> None:
    import ipaddress
    from urllib.parse import urlsplit

    if "://" not in url:  # nnsight's own config may hold a bare host name; it adds https
        url = f"https://{url}"
    parts = urlsplit(url)
    try:
        host = parts.hostname
        parts.port  # noqa: B018 (validates the port)
    except ValueError as error:
        raise ValueError(f"{what}: {url!r} is not a valid host URL ({error})") from None
    if not host:
        raise ValueError(f"{what}: {url!r} names no host; expected e.g. https://host:port")
    if parts.username or parts.password:
        raise ValueError(f"{what}: {url!r} carries credentials in the URL; give the API key through NDIF_API_KEY")
    if parts.scheme != "http" or os.environ.get(ALLOW_HTTP_ENV) == "1":
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host.lower() in ("localhost", "localhost.localdomain") or host.lower().endswith(".localhost")
    if not loopback:
        raise ValueError(
            f"{what}: refusing plain http to {host!r}: the NDIF API key and your requests would travel "
            f"unencrypted. Use https://, a loopback host (localhost, 127.0.0.1), or opt in explicitly with "
            f"{ALLOW_HTTP_ENV}=1 (nnsight-moe run --allow-http)"
        )


def _fingerprint(batch: Any) -> str:
    """A content hash of a batch (and its extras), to tell on resume whether a results file belongs to it."""
    return digest(batch)


def _load_results(path: Any, fingerprints: list[str], identity: dict | None = None) -> dict:
    """Finished results from ``path`` (empty if absent).

    Refuses (``ResultsFileError`` naming the file and what is wrong) a file that is not a results file,
    was modified, or was written for other batches, another model, dtype, function or settings. The
    file is safetensors + JSON: nothing in it is unpickled.
    """
    if path is None or not os.path.exists(path):
        return {}
    header, results = load_results(path, _RESULTS_FORMAT)
    saved_prints, saved_identity = header.get("fingerprints"), header.get("identity")
    if (not isinstance(saved_prints, list) or not all(isinstance(f, str) for f in saved_prints)
            or not isinstance(saved_identity, dict) or not isinstance(results, dict)
            or not all(isinstance(i, int) and 0 <= i < len(saved_prints) for i in results)):
        raise ResultsFileError(f"{path} is not a valid run_batches results file (malformed header or results)")
    if identity is not None:
        changes = identity_changes(saved_identity, identity)
        if changes:
            raise ResultsFileError(
                f"{path} holds results of another run: {'; '.join(changes)} differ. A resume needs the same "
                "model, dtype, function and settings: pass a new results_path (or delete the file) to start over"
            )
    if saved_prints != fingerprints:
        changed = [i for i in results if i >= len(fingerprints) or saved_prints[i] != fingerprints[i]]
        raise ResultsFileError(
            f"{path} holds results for different batches (batches {changed or 'count'} differ): "
            "pass the same batches to resume, or a new results_path"
        )
    return dict(results)


def _keep_results(path: Any, fingerprints: list[str], done: dict, identity: dict | None, index: int) -> bool:
    """After batch ``index``: write the results so far (:func:`_save_results`); True when writing failed.

    A failed write (e.g. a full disk) warns and the run goes on: the results are in memory and the file
    is rewritten after the next batch. (Shared by :func:`run_batches` and the recipe runner.)"""
    try:
        _save_results(path, fingerprints, done, identity)
        return False
    except OSError as error:
        warnings.warn(f"{error}; batch {index + 1}/{len(fingerprints)} is kept in memory and the file is rewritten "
                      "after the next batch", RuntimeWarning, stacklevel=3)
        return True


def _warn_unsaved(path: Any) -> None:
    """The warning at the end of a run whose last write failed (see :func:`_keep_results`)."""
    warnings.warn(f"{path} could not be updated after the last batch: the results returned are complete, but "
                  "a rerun would recompute the batches missing from the file", RuntimeWarning, stacklevel=3)


def _save_results(path: Any, fingerprints: list[str], done: dict, identity: dict | None = None) -> None:
    """Write the results so far atomically (unique temporary file + ``os.replace``; safetensors + JSON)."""
    if path is None:
        return
    save_results(path, _RESULTS_FORMAT, {"fingerprints": fingerprints, "identity": identity or {}}, done)


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {key: _to_cpu(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(item) for item in value)
    return value


def _ship_by_value(fn: Any) -> None:
    """Register ``fn``'s module for by-value pickling when it belongs to nnsight_moe (absent on NDIF)."""
    fn = getattr(fn, "func", fn)  # a functools.partial ships its function
    module = sys.modules.get(getattr(fn, "__module__", None) or "")
    if module is not None and module.__name__.split(".")[0] == "nnsight_moe":
        cloudpickle.register_pickle_by_value(module)


# ------------------------------------------------------------ trace side (shipped by source)
# Everything below runs inside the trace, on the server for remote runs. It may only read torch, the
# other functions of this section and the plain routing functions of nnsight_moe.routing (registered
# for by-value shipping there): no nnsight_moe classes, no client state.


def read_layer(
    model: Any,
    spec: dict,
    layer: int,
    *,
    want: tuple | list | None = None,
    block: Any = None,
    mode: str = "zero",
    edit_logits: Any = None,
    edit_weights: Any = None,
    keep_top: int | None = None,
    shared: bool = True,
    keep_top_renorm: bool = False,
    edit_routing: Any = None,
) -> dict:
    """Read (and optionally edit) MoE layer ``layer`` inside a trace; returns ``{quantity: tensor}``.

    Quantities (:data:`VIEW_QUANTITIES`, shapes as the hook contract) are those of the forward as it
    runs with the edits applied. Call once per layer, layers in increasing order.

    Args:
        model: the nnsight model being traced (the envoy, e.g. ``lm``).
        spec: :func:`moe_spec` of the model.
        layer: a MoE layer index (a key of ``spec["layers"]``).
        want: quantities to return (default all); per-expert ones cost a recomputation.
        block: experts to block in this layer: a list of ids, a bool mask [E] or a per-row mask [b, E].
        mode: ``"zero"`` (gate weight 0), ``"renorm"`` (zero, then renormalise the rest to the original
            sum) or ``"reroute"`` (removed before selection, the next-best expert takes the slot).
        edit_logits: ``fn(logits [b, p, E]) -> logits``; scores, selection and weights are re-derived.
        edit_weights: ``fn(indices [b, p, k], weights [b, p, k]) -> weights``, applied after blocking
            (as setting ``hook_topk_weights``).
        edit_routing: ``fn(routing) -> routing`` on a dict ``{"topk_indices": [b, p, k], "topk_weights":
            [b, p, k]}`` (plus ``"shared_gammas"`` [b, p, S] where the router weights the shared experts:
            Inkling), applied after ``edit_weights``: the routing used as-is (as setting those hook points),
            e.g. one row's routing patched into another's.
        keep_top: keep only the n largest gate weights per token (0 = routed experts off), applied last;
            as ``restrict_experts`` does locally (``keep_top_renorm``: its ``renorm=True``).
        shared: ``False`` switches the shared expert off (its output is set to zero; the reported
            ``shared_gate`` is 0), as ``ablate_shared`` does locally.
    """
    layers = spec["layers"]
    if layer not in layers:
        raise KeyError(f"layer {layer!r} is not a MoE layer of this {spec['family']} model; MoE layers: {sorted(layers)}")
    if layers[layer].get("loop_pass", 0):  # a later pass of a looped layer (Inkling-2-Loop): read the modules'
        from nnsight.intervention.interleaver import Mediator  # loop_pass-th call, pinned as tracer.iter pins a step

        mediator = Mediator.current("the MoE view")
        first_pass = {**spec, "layers": {**layers, layer: {**layers[layer], "loop_pass": 0}}}
        previous, mediator.iteration = mediator.iteration, layers[layer]["loop_pass"]
        try:
            return read_layer(model, first_pass, layer, want=want, block=block, mode=mode, edit_logits=edit_logits,
                              edit_weights=edit_weights, keep_top=keep_top, shared=shared, keep_top_renorm=keep_top_renorm,
                              edit_routing=edit_routing)
        finally:
            mediator.iteration = previous
    want = tuple(want) if want is not None else _all_quantities(layers[layer])
    unknown = [name for name in want if name not in _all_quantities(layers[layer])]
    if unknown:
        raise ValueError(f"unknown quantities {unknown} for layer {layer}; available: {list(_all_quantities(layers[layer]))}")
    if mode not in ("zero", "renorm", "reroute"):
        raise ValueError(f"mode must be one of ('zero', 'renorm', 'reroute'), got {mode!r}")
    info = layers[layer]
    if keep_top is not None and (isinstance(keep_top, bool) or not isinstance(keep_top, int) or keep_top < 0):
        raise ValueError(f"keep_top must be None or an integer >= 0, got {keep_top!r}")
    if not shared and not info["shared"]:
        raise ValueError(f"layer {layer} of this {spec['family']} model has no shared expert; shared=False does not apply")
    ablate_shared = not shared
    rule = info["routing"]
    n_experts, k = info["n_experts"], info["top_k"]
    router = _envoy(model, info["router"])
    x = _envoy(model, info["block"]).input
    b, p = (x.shape[0], x.shape[1]) if x.dim() == 3 else (1, x.shape[0])
    mask = _expert_mask(block, n_experts, b, x.device)
    shared_read = info.get("shared_read", False) and (
        ablate_shared or any(name in want for name in ("shared_acts", "shared_out", "shared_gate"))
        or (info.get("shared_outside", False) and "moe_out" in want))
    read = {}
    if shared_read and info["shared_first"]:
        read = _read_shared(model, info, x, b, p, ablate_shared)
    elif ablate_shared and info["shared_first"]:
        _zero_output(_envoy(model, info["shared"]))

    proj_logits = _envoy(model, info["router_logits"]).output if info.get("router_logits") else None
    output = router.output
    gate_on_input = info.get("gate_on_input", False)  # Llama 4: the router returns (dense scores, logits)
    in_block = info.get("routing_in_block", False)  # DBRX: logits only; the block hands the experts the rest
    dispatch = info.get("dispatch_router", False)  # JetMoE: the router returns a dispatch plan, logits last
    if in_block:
        experts_args, experts_kwargs = _envoy(model, info["experts"]).inputs
        raw_logits, raw_indices, raw_weights = output, experts_args[1], experts_args[2]
    elif dispatch:
        raw_logits, raw_weights, raw_indices = output[4], None, None
    elif gate_on_input:
        raw_first, raw_logits, raw_weights, raw_indices = output[0], output[1], None, None
    else:
        raw_logits, raw_weights, raw_indices = output[0], output[1], output[2]
    if proj_logits is not None:  # the router's first output is its scores, not its logits (Gemma-4)
        raw_first, raw_logits = raw_logits, proj_logits
    # HF routers return flattened [tokens, ...] tensors, which nnsight cannot narrow to an invoke's
    # rows: take this invoke's rows [start, start + b) of the combined batch ourselves.
    start, total = _invoke_rows(b, raw_logits.numel() // (p * n_experts))
    logits = raw_logits.reshape(total, p, n_experts)[start : start + b]
    if gate_on_input:  # the router's own top-k of its logits, its weights read off its dense scores
        indices = rule_select(rule, rule_scores(rule, logits), None, None, k)
        weights = raw_first.reshape(total, p, n_experts)[start : start + b].gather(-1, indices)
    elif dispatch:  # the router's own top-k and softmax over it, from its logits
        indices = rule_select(rule, rule_scores(rule, logits), None, None, k)
        weights = rule_weights(rule, rule_scores(rule, logits), indices, raw_logits.dtype, x.dtype, logits)
    else:
        indices = raw_indices.reshape(total, p, k)[start : start + b]
        weights = raw_weights.reshape(total, p, k)[start : start + b]
    kind = rule["kind"]
    if kind == "skip":  # Zaya hands a skip slot on as (expert 0, weight 0): its own selection, by its rule
        bias = _envoy(model, f"{info['block']}.{rule['bias']}").reshape(-1) if rule["bias"] else None
        indices = rule_select(rule, rule_scores(rule, logits), None, bias, k)
    gammas = _rows(output[3], b, p) if kind == "sink" else None  # Inkling: the shared experts' gammas
    rederive = edit_logits is not None or (mask is not None and mode == "reroute")
    if rederive and rule["kind"] == "sparsemixer":
        raise ValueError(f"layer {layer}: the remote view cannot re-derive sparsemixer routing (phimoe); use mode='zero' or 'renorm'")
    if edit_logits is not None:
        logits = edit_logits(logits)
    scores = rule_scores(rule, logits)
    if rederive:
        exclude = mask[:, None, :] if mask is not None and mode == "reroute" else None
        bias = _envoy(model, f"{info['block']}.{rule['bias']}").reshape(-1) if rule["bias"] else None
        scale = _envoy(model, f"{info['block']}.{rule['expert_scale']}") if rule.get("expert_scale") else None
        if rule["kind"] == "hash":  # experts chosen by token id: the model's own indices, weights re-derived
            if exclude is not None:
                raise ValueError(f"layer {layer} is hash-routed (its experts are a fixed lookup of the token ids), so "
                                 "mode='reroute' has no meaning there: use mode='zero' or 'renorm'")
        else:
            indices = rule_select(rule, scores, exclude, bias, k)
        if kind == "sink":  # normalised with the shared experts' gammas, on the router's own shared logits
            global_scale = _envoy(model, f"{info['block']}.{rule['global_scale']}") if rule.get("global_scale") else None
            weights, gammas = sink_weights(rule, scores, indices, sink_logits(router, x, n_experts).reshape(b, p, -1),
                                           global_scale, x.dtype, logits)
        else:
            weights = rule_weights(rule, scores, indices, raw_logits.dtype, x.dtype, logits, scale)
    edited = rederive
    if mask is not None and mode != "reroute":
        weights = zero_weights(weights, indices, mask, mode == "renorm")
        edited = True
    if edit_weights is not None:
        weights = edit_weights(indices, weights)
        edited = True
    if edit_routing is not None:
        routing = edit_routing({"topk_indices": indices, "topk_weights": weights,
                                **({"shared_gammas": gammas} if gammas is not None else {})})
        indices, weights, gammas = routing["topk_indices"], routing["topk_weights"], routing.get("shared_gammas", gammas)
        edited = True
    if keep_top is not None:
        weights = keep_top_weights(weights, keep_top, keep_top_renorm)
        edited = True
    if edited and in_block:  # the experts' (top_k_index, top_k_weights) arguments
        _envoy(model, info["experts"]).inputs = (
            (experts_args[0], _splice(raw_indices, indices, start, total), _splice(raw_weights, weights, start, total)),
            experts_kwargs)
    elif edited and dispatch:  # one plan for every invoke's tokens: the others' routing (and edits) is kept
        all_indices, all_weights = _plan_routing(output, k, n_experts)
        plan_start, plan_total = _invoke_rows(b, all_indices.shape[0] // p)
        plan = dispatch_plan(_splice(all_indices, indices, plan_start, plan_total),
                             _splice(all_weights, weights, plan_start, plan_total), n_experts)
        router.output = (*plan, _splice(raw_logits, logits, start, total))
    elif edited and gate_on_input:
        dense = dense_scores(weights.reshape(b * p, k), indices.reshape(b * p, k), n_experts, raw_first.dtype)
        router.output = (_splice(raw_first, dense.reshape(b, p, n_experts), start, total),
                         _splice(raw_logits, logits, start, total))
    elif edited:
        first = (_splice(raw_first, scores, start, total) if proj_logits is not None
                 else _splice(raw_logits, logits, start, total))
        handed = indices.masked_fill(indices == rule["skip"], 0) if kind == "skip" else indices
        router.output = (
            first,
            _splice(raw_weights, weights, start, total),
            _splice(raw_indices, handed, start, total),
            *((_splice(output[3], gammas, start, total),) if kind == "sink" else output[3:]),
        )

    values = {"router_logits": logits, "router_scores": scores, "topk_indices": indices, "topk_weights": weights}
    if gammas is not None:
        values["shared_gammas"] = gammas
    flat = x.reshape(b * p, x.shape[-1])
    per_expert = any(name in want for name in ("expert_acts", "expert_out", "routed_out"))
    latent = info.get("d_latent", 0) > 0
    if info.get("experts_input") and per_expert:
        flat = _rows(_envoy(model, info["experts"]).input, b, p).reshape(b * p, x.shape[-1])  # a normalised copy (Gemma-4)
    experts_in = flat
    if latent and (per_expert or "latent_in" in want):  # a latent MoE: the experts run on the projected input
        values["latent_in"] = _rows(_envoy(model, info["experts"]).input, b, p)
        experts_in = values["latent_in"].reshape(b * p, -1)
    if gate_on_input and per_expert:
        experts = _envoy(model, info["experts"])  # the model's dense computation on its own (scaled) input
        routed_in = experts.input  # [E * tokens of every invoke, d]: this invoke's tokens of each expert
        in_start, in_total = _invoke_rows(b, routed_in.shape[0] // (n_experts * p))
        routed_in = routed_in.reshape(n_experts, in_total, p, -1)[:, in_start : in_start + b]
        acts_dense, out_dense = dense_experts(experts, routed_in.reshape(n_experts, b * p, -1))
        slots = indices.reshape(b * p, k)
        tokens = torch.arange(b * p, device=slots.device)[:, None].expand(b * p, k)
        values["expert_acts"] = acts_dense[slots, tokens].reshape(b, p, k, -1)
        values["expert_out"] = out_dense[slots, tokens].reshape(b, p, k, -1)
        values["routed_out"] = out_dense.sum(dim=0).reshape(b, p, -1)
    elif info.get("identity_experts") is not None and per_expert:
        acts, out = identity_slots(_envoy(model, info["experts"]), flat, indices.reshape(b * p, k), info["identity_experts"])
        values["expert_acts"] = acts.reshape(b, p, k, -1)
        values["expert_out"] = out.reshape(b, p, k, -1)
        values["routed_out"] = (values["expert_out"] * weights[..., None]).sum(dim=-2).to(x.dtype)
    elif dispatch and per_expert:
        acts, out = parallel_slots(_envoy(model, info["block"]), flat, indices.reshape(b * p, k))
        values["expert_acts"] = acts.reshape(b, p, k, -1)
        values["expert_out"] = out.reshape(b, p, k, -1)
        values["routed_out"] = (values["expert_out"] * weights[..., None]).sum(dim=-2).to(x.dtype)
    elif in_block and per_expert:
        acts, out = dbrx_slots(_envoy(model, info["experts"]), flat, indices.reshape(b * p, k))
        values["expert_acts"] = acts.reshape(b, p, k, -1)
        values["expert_out"] = out.reshape(b, p, k, -1)
        values["routed_out"] = (values["expert_out"] * weights[..., None]).sum(dim=-2).to(x.dtype)
    elif kind == "skip" and per_expert:  # the skip expert's slots compute nothing (acts and out 0)
        skip = (indices == rule["skip"]).reshape(b * p, k, 1)
        acts, out = _expert_slots(_envoy(model, info["experts"]), experts_in,
                                  indices.reshape(b * p, k).masked_fill(skip[..., 0], 0))
        values["expert_acts"] = acts.masked_fill(skip, 0).reshape(b, p, k, -1)
        values["expert_out"] = out.masked_fill(skip, 0).reshape(b, p, k, -1)
        values["routed_out"] = (values["expert_out"] * weights[..., None]).sum(dim=-2).to(experts_in.dtype)
    elif per_expert:
        fp32 = info.get("experts_float32", False)  # the experts compute and sum in float32 (see Adapter)
        acts, out = _expert_slots(_envoy(model, info["experts"]), experts_in.float() if fp32 else experts_in,
                                  indices.reshape(b * p, k))
        values["expert_acts"] = acts.reshape(b, p, k, -1)
        values["expert_out"] = out.reshape(b, p, k, -1)
        if fp32:
            values["routed_out"] = expert_order_sum(values["expert_out"], weights, indices).to(experts_in.dtype)
        else:
            values["routed_out"] = (values["expert_out"] * weights[..., None]).sum(dim=-2).to(experts_in.dtype)
    if latent and "latent_out" in want:  # the routed sum projected back to d_model, as the forward ran it
        values["latent_out"] = _rows(_envoy(model, info["latent_out"]).output, b, p)
    if gammas is not None and any(name in want for name in ("shared_acts", "shared_out", "shared_gate")):
        acts, out = gamma_shared(_envoy(model, info["shared"]), flat, gammas.reshape(b * p, -1))
        values["shared_acts"], values["shared_out"] = acts.reshape(b, p, -1), out.reshape(b, p, -1)
        values["shared_gate"] = torch.ones(b, p, 1, dtype=x.dtype, device=x.device) * (0 if ablate_shared else 1)
    elif info["shared"] and not info.get("shared_read", False) and any(
            name in want for name in ("shared_acts", "shared_out", "shared_gate")):
        shared = _envoy(model, info["shared"])
        if info["shared_gated"]:
            shared_acts = shared.act_fn(shared.gate_proj(flat)) * shared.up_proj(flat)
        else:
            shared_acts = shared.act_fn(shared.up_proj(flat))
        values["shared_acts"] = shared_acts.reshape(b, p, -1)
        values["shared_out"] = shared.down_proj(shared_acts).reshape(b, p, -1)
        if info["shared_gate"]:
            values["shared_gate"] = torch.sigmoid(_envoy(model, info["shared_gate"])(flat)).reshape(b, p, 1)
        else:
            values["shared_gate"] = torch.ones(b, p, 1, dtype=x.dtype, device=x.device)
        if ablate_shared:
            values["shared_gate"] = values["shared_gate"] * 0
    block_out = None
    if info.get("shared_outside", False) and "moe_out" in want:  # the block runs before the shared MLP beside it
        block_out = _envoy(model, info["block"]).output
    if shared_read and not info["shared_first"]:
        read = _read_shared(model, info, x, b, p, ablate_shared)
    elif ablate_shared and not info["shared_first"]:
        _zero_output(_envoy(model, info["shared"]))
    values.update({name: value for name, value in read.items() if name != "ran"})
    if info.get("post") and "moe_sum" in want:  # the input of the block's post-processing (post-MoE norm)
        values["moe_sum"] = _rows(_envoy(model, info["post"]).input, b, p)
    if "moe_out" in want:
        moe_out = block_out if block_out is not None else _envoy(model, info.get("moe_out") or info["block"]).output
        values["moe_out"] = _rows(moe_out[0] if isinstance(moe_out, tuple) else moe_out, b, p)  # Llama 4: flattened
        if block_out is not None:  # the decoder layer adds the shared expert's output (as it ran) to the block's
            values["moe_out"] = values["moe_out"] + read["ran"]
    return {name: values[name] for name in want}


def _read_shared(model: Any, info: dict, x: torch.Tensor, b: int, p: int, ablate: bool) -> dict:
    """Shared-expert quantities read from the forward (its down projection's input, its output), for a
    shared MLP the view does not recompute (clamped or fused: Step-3.7, MiniMax-M3, GLM-5-Next; one
    beside the block: Granite). ``x`` is the block input (for a sigmoid shared gate). With ``ablate`` its
    output is set to zero. ``"ran"``: the output as the forward uses it."""
    shared = _envoy(model, info["shared"])
    acts = _rows(_envoy(model, info["shared_down"]).input, b, p)
    out = shared.output
    rows = _rows(out, b, p).clone()  # as the MLP returned it: a block may add into it in place (Llama 4)
    ran = rows
    if ablate:
        ran = torch.zeros_like(rows)
        if out.dim() == 3:
            shared.output = torch.zeros_like(out)
        else:
            start, total = _invoke_rows(b, out.numel() // (p * out.shape[-1]))
            shared.output = _splice(out, ran, start, total)
    if info["shared_gate"]:
        gate = torch.sigmoid(_envoy(model, info["shared_gate"])(x.reshape(b * p, x.shape[-1]))).reshape(b, p, 1)
    else:
        gate = torch.ones(b, p, 1, dtype=rows.dtype, device=rows.device)
    return {"shared_acts": acts, "shared_out": rows, "shared_gate": gate * 0 if ablate else gate, "ran": ran}


def _plan_routing(plan: tuple, k: int, n_experts: int) -> tuple:
    """(indices, weights) [tokens, k] of every token in a JetMoE dispatch plan (the router's output), token-major.

    The plan lists the slots sorted by expert (``plan[0]``: slot ids, ``plan[2]``: their gates,
    ``plan[3]``: slots per expert), so slot ``plan[0][j]`` went to the expert owning sorted position j."""
    order, gates, sizes = plan[0], plan[2], plan[3]
    owner = torch.repeat_interleave(torch.arange(n_experts, device=order.device),
                                    torch.as_tensor(sizes, device=order.device))
    indices = torch.empty_like(order).scatter(0, order, owner.to(order.dtype))
    weights = torch.empty_like(gates).scatter(0, order, gates)
    return indices.reshape(-1, k), weights.reshape(-1, k)


def _rows(value: torch.Tensor, b: int, p: int) -> torch.Tensor:
    """A module's input / output as this invoke's [b, p, d] (a flattened [tokens, d] tensor is sliced)."""
    if value.dim() == 3:
        return value
    start, total = _invoke_rows(b, value.numel() // (p * value.shape[-1]))
    return value.reshape(total, p, -1)[start : start + b]


def _zero_output(envoy: Any) -> None:
    """Replace a module's output by zeros (inside the trace)."""
    envoy.output = torch.zeros_like(envoy.output)


def _all_quantities(info: dict) -> tuple:
    """The quantities a layer has (shared ones only with a shared expert)."""
    shared = ("shared_acts", "shared_out", "shared_gate")
    return tuple(name for name in VIEW_QUANTITIES if (info["shared"] or name not in shared)
                 and (info.get("d_latent", 0) or name not in ("latent_in", "latent_out"))
                 and (info.get("post") or name != "moe_sum") and (info.get("shared_gammas") or name != "shared_gammas"))


def _invoke_rows(b: int, rows: int) -> tuple:
    """(first row, rows in total) of the running invoke in a flattened router tensor holding ``rows`` rows.

    One invoke (or a tensor nnsight already narrowed) is the whole tensor: (0, b). With several
    ``tracer.invoke`` calls the row range is the running worker's nnsight batch group.
    """
    if rows == b:
        return 0, b
    from nnsight.intervention.interleaver import Mediator

    mediator = Mediator.current("the MoE view")
    group = mediator.batch_group
    batcher = mediator.interleaver.batcher if mediator.interleaver is not None else None
    if group is None or batcher is None or batcher.total != rows:
        raise RuntimeError(f"cannot find this invoke's rows in a router output of {rows} rows (invoke has {b})")
    return group[0], rows


def _splice(full: torch.Tensor, rows: torch.Tensor, start: int, total: int) -> torch.Tensor:
    """``full`` (flattened [total * p, ...]) with rows [start, start + b) replaced by ``rows`` [b, p, ...]."""
    b, p = rows.shape[0], rows.shape[1]
    stacked = full.reshape(total, p, *rows.shape[2:])
    edited = torch.cat([stacked[:start], rows.to(full.dtype), stacked[start + b :]], dim=0)
    return edited.reshape(full.shape)


def _envoy(model: Any, path: str) -> Any:
    """The envoy at dotted ``path`` below ``model`` (integer parts index module lists)."""
    for part in path.split("."):
        model = model[int(part)] if part.isdigit() else getattr(model, part)
    return model


def _expert_mask(block: Any, n_experts: int, batch: int, device: Any) -> Any:
    """``block`` (ids, bool [E] or bool [b, E]) as a bool mask [1 or b, E]; None when nothing is blocked."""
    if block is None:
        return None
    if isinstance(block, torch.Tensor) and block.dtype == torch.bool:
        mask = block.to(device)
        if mask.shape[-1] != n_experts or mask.dim() not in (1, 2) or (mask.dim() == 2 and mask.shape[0] != batch):
            raise ValueError(f"a blocking mask must be bool [{n_experts}] or [{batch}, {n_experts}], got {tuple(mask.shape)}")
        return mask if mask.dim() == 2 else mask[None, :]
    ids = [int(e) for e in (block.tolist() if isinstance(block, torch.Tensor) else block)]
    bad = [e for e in ids if not 0 <= e < n_experts]
    if bad:
        raise ValueError(f"expert ids {bad} are out of range: valid experts are 0..{n_experts - 1}")
    mask = torch.zeros(1, n_experts, dtype=torch.bool, device=device)
    mask[0, ids] = True
    return mask


def _expert_slots(experts: Any, x: torch.Tensor, indices: torch.Tensor) -> tuple:
    """Per-slot (acts [n, k, d_expert], out [n, k, d]) recomputed from the experts' weights.

    ``x`` [n, d] are the block's tokens, ``indices`` [n, k] the selected experts. Works on any
    transformers fused experts module (``gate_up_proj``/``up_proj``, ``down_proj``, optional biases,
    transposed layout, post-expert norm), whatever experts implementation the model runs.
    """
    n, k = indices.shape
    flat = indices.reshape(-1)
    rows = torch.arange(n, device=x.device).repeat_interleave(k)
    transposed = getattr(experts, "is_transposed", False)
    has_gate = getattr(experts, "has_gate", True)
    has_bias = getattr(experts, "has_bias", False)
    up = experts.gate_up_proj if has_gate else experts.up_proj
    down = experts.down_proj
    acts = out = None
    for e in flat.unique().tolist():
        slots = (flat == e).nonzero().squeeze(-1)
        h = x[rows[slots]] @ (up[e] if transposed else up[e].T).to(x.dtype)
        if has_bias:
            h = h + (experts.gate_up_proj_bias if has_gate else experts.up_proj_bias)[e]
        a = experts._apply_gate(h) if has_gate else experts.act_fn(h)
        o = a @ (down[e] if transposed else down[e].T).to(a.dtype)
        if has_bias:
            o = o + experts.down_proj_bias[e]
        if getattr(experts, "has_post_expert_norm", False):
            o = experts.post_expert_norm(o)
        if acts is None:
            acts = a.new_zeros(n * k, a.shape[-1])
            out = o.new_zeros(n * k, o.shape[-1])
        acts[slots] = a
        out[slots] = o
    return acts.reshape(n, k, -1), out.reshape(n, k, -1)


# Ship this module's functions by value (as source): nnsight_moe is not installed on NDIF.
cloudpickle.register_pickle_by_value(sys.modules[__name__])
