"""Remote view and batch runner under nnsight's local simulation backend (serialise, deserialise, run)."""

from __future__ import annotations

import copy
import functools
import re
import sys

import nnsight
import pytest
import torch
from nnsight.intervention.backends.local import LocalSimulationBackend
from nnsight.intervention.serialization import CustomCloudUnpickler, loads
from nnsight.schema.request import RequestModel

import nnsight_moe
from nnsight_moe.files import load_results
from nnsight_moe.remote import MoEView, RemoteBatchError, moe_spec, read_layer, run_batches
from nnsight_moe.adapters import supported_families
from nnsight_moe.testing import tiny_model

from helpers import capture_hooks
from helpers import language_model

FAMILIES = ["qwen2_moe", "olmoe", "mixtral", "deepseek_v3"]
ATOL = 1e-5


def _ids(batch=2, pos=6, seed=0):
    return torch.randint(3, 128, (batch, pos), generator=torch.Generator().manual_seed(seed))


def _oracle(hf, ids, edit=None):
    """Hook values and logits of an attached copy of ``hf`` (``edit(copy)`` is a context manager)."""
    reference = copy.deepcopy(hf)
    handle = nnsight_moe.attach(reference)
    out = {}

    def run():
        out["logits"] = reference(ids).logits

    with torch.no_grad():
        if edit is None:
            values = capture_hooks(handle, run)
        else:
            with edit(reference):
                values = capture_hooks(handle, run)
    return handle.layout, values, out["logits"]


def _assert_view_equals_hooks(layout, views, values):
    assert views, "the view returned layers"
    for index, quantities in views.items():
        path = layout.layer(index).path
        assert set(quantities) == {name[5:] for name in layout.layer(index).hook_names}
        for name, value in quantities.items():
            expected = values[f"{path}.hook_{name}"]
            assert value.shape == expected.shape, name
            torch.testing.assert_close(value.to(expected.dtype), expected, atol=ATOL, rtol=0, msg=f"layer {index} {name}")


@pytest.mark.parametrize("family", FAMILIES)
def test_view_on_unmodified_model_equals_attached_hooks(family):
    hf = tiny_model(family)
    ids = _ids()
    layout, values, logits = _oracle(hf, ids)
    lm = language_model(hf)
    view = MoEView(lm)
    assert view.moe_layers == layout.moe_layers
    with torch.no_grad(), lm.trace(ids, remote="local"):
        views = nnsight.save({index: view.layer(index) for index in view.moe_layers})
        out = lm.output.logits.save()
    assert nnsight_moe.handle_of(hf) is None, "the view attaches nothing"
    _assert_view_equals_hooks(layout, views, values)
    torch.testing.assert_close(out, logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3"])
@pytest.mark.parametrize("mode", ["zero", "renorm", "reroute"])
def test_view_blocking_equals_block_experts(family, mode):
    hf = tiny_model(family)
    ids = _ids()
    blocked = {index: [1, 4] for index in nnsight_moe.layout(hf).moe_layers}
    _assert_view_edit_equals_hook_edit(hf, ids, lambda m: nnsight_moe.block_experts(m, blocked, mode=mode),
                                       lambda i: {"block": blocked[i], "mode": mode}, min_change=1e-3)


def _assert_view_edit_equals_hook_edit(hf, ids, edit, options, min_change):
    """The view with ``options(layer)`` on the unmodified model = the attached model under ``edit``."""
    layout, values, logits = _oracle(hf, ids, edit)
    _, _, plain = _oracle(hf, ids)
    assert (logits - plain).abs().max() > min_change, "the edit changes the output"
    lm = language_model(hf)
    view = MoEView(lm)
    with torch.no_grad(), lm.trace(ids, remote="local"):
        views = nnsight.save({i: view.layer(i, **options(i)) for i in view.moe_layers})
        out = lm.output.logits.save()
    _assert_view_equals_hooks(layout, views, values)
    torch.testing.assert_close(out, logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", supported_families())
def test_view_equals_hooks_on_every_family(family):
    """Every family's routing rule as plain data: scores, selection and weights, also re-derived (reroute)."""
    hf = tiny_model(family)
    layout = nnsight_moe.layout(hf)
    ids = _ids(pos=4)
    mode = "zero" if family == "phimoe" else "reroute"  # the view cannot re-derive phimoe's sparsemixer
    # a hash-routed layer (DeepSeek-V4's first) refuses reroute: it is read unedited
    blocked = {index: [0] for index in layout.moe_layers if mode != "reroute" or layout.layer(index).routing._kind != "hash"}
    # a token classifier (openai_privacy_filter) is no LanguageModel: wrap it as a plain nnsight model
    lm = language_model(hf) if hf.can_generate() else nnsight.NNsight(hf)
    view = MoEView(lm)
    for edit in (None, blocked):
        _, values, logits = _oracle(hf, ids, edit and (lambda m: nnsight_moe.block_experts(m, blocked, mode=mode)))
        with torch.no_grad(), lm.trace(ids, remote="local"):
            views = nnsight.save({i: view.layer(i, block=edit and edit.get(i), mode=mode) for i in view.moe_layers})
            out = lm.output.logits.save()
        _assert_view_equals_hooks(layout, views, values)
        torch.testing.assert_close(out, logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3", "ernie4_5_moe", "hunyuan_v1_moe", "olmoe",
                                    "granitemoeshared", "granitemoehybrid", "minimax_m3_vl"])
@pytest.mark.parametrize("top, shared", [(0, True), (1, True), (1, False), (None, False)])
def test_view_keep_top_and_shared_ablation_equal_restrict_experts(family, top, shared):
    """Table-2 configurations; the shared expert runs before the router in qwen2_moe / ernie / hunyuan, and
    beside the block, after it, in the Granite families; minimax_m3_vl's fused shared MLP is read from the forward."""
    hf = tiny_model(family)
    layout = nnsight_moe.layout(hf)
    if not shared and not layout.has_shared:
        pytest.skip("no shared expert")
    _assert_view_edit_equals_hook_edit(hf, _ids(), lambda m: nnsight_moe.restrict_experts(m, top, shared=shared),
                                       lambda i: {"keep_top": top, "shared": shared}, min_change=1e-4)


def test_view_hash_layer_edits():
    """DeepSeek-V4's hash layer in the view: its own indices; an edited logit re-derives the weights at them;
    reroute is refused, as block_experts refuses it."""
    hf = tiny_model("deepseek_v4")
    ids = _ids()
    lm = language_model(hf)
    view = MoEView(lm)
    double = lambda logits: logits * 2  # noqa: E731
    layout, values, logits = _oracle(hf, ids, lambda m: _edit_logits(m, 0, double))
    with torch.no_grad(), lm.trace(ids, remote="local"):
        views = nnsight.save({0: view.layer(0, edit_logits=double)})
        out = lm.output.logits.save()
    assert torch.equal(views[0]["topk_indices"], hf.get_submodule(layout.layer(0).router).tid2eid[ids])
    _assert_view_equals_hooks(layout, views, values)
    torch.testing.assert_close(out, logits, atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="hash-routed"), torch.no_grad(), lm.trace(ids):
        view.layer(0, block=[1], mode="reroute")


def _edit_logits(model, layer, fn):
    """A context that applies ``fn`` to ``hook_router_logits`` of ``layer`` on an attached ``model``."""
    import contextlib

    @contextlib.contextmanager
    def edit():
        point = nnsight_moe.handle_of(model).block(layer).hook_router_logits
        point.add_hook(lambda logits, hook: fn(logits))
        try:
            yield
        finally:
            point.remove_hooks()

    return edit()


def test_view_keep_top_and_shared_errors():
    lm = language_model(tiny_model("olmoe"))
    view = MoEView(lm)
    with pytest.raises(ValueError, match="no shared expert"), torch.no_grad(), lm.trace(_ids()):
        view.layer(view.moe_layers[0], shared=False)
    with pytest.raises(ValueError, match="keep_top must be"), torch.no_grad(), lm.trace(_ids()):
        view.layer(view.moe_layers[0], keep_top=-1)


def test_view_router_and_weight_edits_equal_hook_edits():
    hf = tiny_model("olmoe")
    ids = _ids()
    layer = 1
    boost = torch.zeros(8)
    boost[6] = 3.0

    def edited(model):
        point = nnsight_moe.handle_of(model).block(layer).hook_router_logits
        point.add_hook(lambda logits, hook: logits + boost)
        return _Removing(point)

    layout, values, logits = _oracle(hf, ids, edited)
    lm = language_model(hf)
    view = MoEView(lm)
    with torch.no_grad(), lm.trace(ids, remote="local"):
        views = nnsight.save({layer: view.layer(layer, edit_logits=lambda logits: logits + boost)})
        out = lm.output.logits.save()
    assert (views[layer]["topk_indices"] == 6).any(-1).all(), "the edit re-routes every token to expert 6"
    _assert_view_equals_hooks(layout, {layer: views[layer]}, values)
    torch.testing.assert_close(out, logits, atol=ATOL, rtol=0)

    # edit_weights = setting hook_topk_weights: halve every gate
    _, _, halved = _oracle(hf, ids, lambda m: _Setting(nnsight_moe.handle_of(m).block(layer).hook_topk_weights))
    with torch.no_grad(), lm.trace(ids, remote="local"):
        view.layer(layer, want=("topk_weights",), edit_weights=lambda indices, weights: weights * 0.5)
        out = lm.output.logits.save()
    torch.testing.assert_close(out, halved, atol=ATOL, rtol=0)


class _Removing:
    def __init__(self, point):
        self.point = point

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.point.remove_hooks()


class _Setting(_Removing):
    def __enter__(self):
        self.point.add_hook(lambda weights, hook: weights * 0.5)
        return self


@pytest.mark.parametrize("implementation", ["eager", "batched_mm"])
def test_view_is_independent_of_the_experts_implementation(implementation):
    hf = tiny_model("mixtral")
    ids = _ids()
    layout, values, logits = _oracle(hf, ids)
    hf.set_experts_implementation(implementation)
    lm = language_model(hf)
    view = MoEView(lm)
    with torch.no_grad(), lm.trace(ids, remote="local"):
        views = nnsight.save({index: view.layer(index) for index in view.moe_layers})
    _assert_view_equals_hooks(layout, views, values)


def test_view_two_invokes_get_their_own_rows():
    hf = tiny_model("qwen2_moe")
    lm = language_model(hf)
    view = MoEView(lm)
    first, second = "w5 w9 w20 w7 w11", "w40 w41 w42 w100 w17"
    with torch.no_grad():
        with lm.trace(remote="local") as tracer:
            with tracer.invoke(first):
                a = nnsight.save(view.layer(1, want=("topk_weights", "expert_out")))
            with tracer.invoke(second):
                b = nnsight.save(view.layer(1, block=[0], want=("topk_weights", "shared_out")))
        with lm.trace(first):
            a_alone = nnsight.save(view.layer(1, want=("topk_weights", "expert_out")))
        with lm.trace(second):
            b_alone = nnsight.save(view.layer(1, block=[0], want=("topk_weights", "shared_out")))
    for got, alone in ((a, a_alone), (b, b_alone)):
        assert got["topk_weights"].shape == (1, 5, 2)
        for name in got:
            torch.testing.assert_close(got[name], alone[name], atol=ATOL, rtol=0)


# Test classes call their bases explicitly: nnsight ships functions of by-value modules as source,
# which loses the ``__class__`` cell that a bare ``super()`` needs.
class _Recording(LocalSimulationBackend):
    """The local simulation backend, keeping the serialised request it runs."""

    def __call__(self, tracer):
        self.blob = RequestModel.serialize(tracer)
        return LocalSimulationBackend.__call__(self, tracer)


class _Inventory(CustomCloudUnpickler):
    """Unpickler that records every global (class / function) the request refers to by name."""

    def __init__(self, file, persistent_objects):
        CustomCloudUnpickler.__init__(self, file, persistent_objects)
        self.globals: list[tuple[str, str]] = []
        self.persistent: list = []

    def find_class(self, module, name):
        self.globals.append((module, name))
        return CustomCloudUnpickler.find_class(self, module, name)

    def persistent_load(self, pid):
        self.persistent.append(pid)
        return CustomCloudUnpickler.persistent_load(self, pid)


#: Top-level modules a request may name: packages installed on an NDIF server, and the stdlib.
SERVER_SIDE = {"nnsight", "torch", "transformers", "builtins", "copyreg", "functools", "types", "cloudpickle", "collections", "_codecs"}


def _inventory(blob, lm):
    """Unpickle a serialised request, recording what it names; returns the unpickler."""
    kept = {}

    def unpickler(file, persistent):
        kept["u"] = _Inventory(file, persistent)
        return kept["u"]

    loads(blob, lm._remoteable_persistent_objects(), unpickler=unpickler)
    return kept["u"]


def _foreign_modules(seen):
    """Modules named by a request that a server would not have (nnsight's local simulation does not
    hide packages whose name contains "nnsight", so it would not catch a reference to nnsight_moe)."""
    return {module for module, _ in seen.globals if module.split(".")[0] not in SERVER_SIDE}


def test_serialised_request_carries_no_hooks_or_custom_classes():
    hf = tiny_model("qwen2_moe")
    lm = language_model(hf)
    view = MoEView(lm)
    backend = _Recording(lm)
    with torch.no_grad(), lm.trace(_ids(), backend=backend):
        views = nnsight.save({index: view.layer(index, block=[2], mode="reroute") for index in view.moe_layers})
    assert views[1]["router_scores"].shape == (2, 6, 8)

    seen = _inventory(backend.blob, lm)
    assert _foreign_modules(seen) == set()
    names = {name for _, name in seen.globals}
    assert "_make_skeleton_class" not in names, "no class is shipped by value"
    assert not {"HookPoint", "RemovableHandle", "BlockState", "AttachHandle"} & names
    # the model, its modules, tokenizer and interleaver are references resolved by the server
    assert all(pid in ("Interleaver", "Pipeline", "Tokenizer") or pid.startswith("Module:") for pid in seen.persistent)
    assert not any("hook_" in pid for pid in seen.persistent)
    # no reference to our package: only the file names of the modules shipped by value (as source)
    by_value = re.sub(rb"nnsight_moe/(remote|routing|input_gated|block_routed|dispatch_experts|identity_experts|shared_gammas)\.py", b"", backend.blob)
    assert b"nnsight_moe" not in by_value
    assert b"def read_layer" in backend.blob, "the view's functions travel as source"
    # and the model it ran on carries no hooks of ours
    assert nnsight_moe.handle_of(hf) is None
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in hf.modules())


# ------------------------------------------------------------------------------- runner
def _scores_fn(view, model, batch):
    """Router scores of the last position of every MoE layer (what an attribution request ships)."""
    return {i: view.layer(i, want=("router_scores",))["router_scores"][:, -1] for i in view.moe_layers}


class _Flaky(LocalSimulationBackend):
    """Local simulation that fails on chosen calls and counts the traces it ran."""

    def __init__(self, model, fail_on, counter):
        LocalSimulationBackend.__init__(self, model)
        self.fail_on, self.counter = fail_on, counter

    def __call__(self, tracer):
        self.counter.append(len(self.counter))
        assert _foreign_modules(_inventory(RequestModel.serialize(tracer), self.model)) == set()
        if len(self.counter) - 1 in self.fail_on:
            raise ConnectionError("simulated NDIF outage")
        return LocalSimulationBackend.__call__(self, tracer)


def test_run_batches_failure_keeps_results_and_resumes(tmp_path, monkeypatch, capsys):
    nnsight.register(sys.modules[__name__])  # _scores_fn ships by value, as a user's own module would
    hf = tiny_model("deepseek_v3")
    lm = language_model(hf)
    batches = [_ids(2, 5, seed) for seed in range(4)]
    fn = functools.partial(_scores_fn, MoEView(lm))
    expected = run_batches(lm, batches, fn, progress=False)  # plain local run
    path = tmp_path / "results.pt"

    calls: list = []
    monkeypatch.setattr(lm, "_remote_backend", lambda *a, **k: _Flaky(lm, {2}, calls))
    with pytest.raises(RemoteBatchError, match="batch 2 of 4") as info:
        run_batches(lm, batches, fn, remote="local", results_path=path)
    assert info.value.batch == 2 and info.value.completed == [0, 1]
    assert isinstance(info.value.__cause__, ConnectionError)
    _, saved = load_results(path, "nnsight_moe.run_batches/2")
    assert sorted(saved) == [0, 1]
    assert "batch 2/4" in capsys.readouterr().out

    calls.clear()
    results = run_batches(lm, batches, fn, remote="local", results_path=path)
    assert len(calls) == 2, "only the unfinished batches ran again"
    assert "resuming" in capsys.readouterr().out
    assert len(results) == 4
    for got, want in zip(results, expected):
        for layer in want:
            torch.testing.assert_close(got[layer], want[layer], atol=ATOL, rtol=0)
    # results are the router scores a direct trace gives
    with torch.no_grad(), lm.trace(batches[3]):
        direct = nnsight.save(fn(lm, batches[3]))
    torch.testing.assert_close(results[3][2], direct[2], atol=0, rtol=0)

    calls.clear()
    run_batches(lm, batches, fn, remote="local", results_path=path, progress=False)
    assert calls == [], "a finished run recomputes nothing"


def test_run_batches_rejects_bad_inputs(tmp_path):
    lm = language_model(tiny_model("olmoe"))
    batches = [_ids(1, 4, 0)]
    fn = functools.partial(_scores_fn, MoEView(lm))
    with pytest.raises(ValueError, match="remote must be False, True"):
        run_batches(lm, batches, fn, remote="ndif")
    with pytest.raises(TypeError, match="fn must be a callable"):
        run_batches(lm, batches, "scores")
    path = tmp_path / "r.pt"
    run_batches(lm, batches, fn, results_path=path, progress=False)
    with pytest.raises(ValueError, match="different batches"):
        run_batches(lm, [_ids(1, 4, 1)], fn, results_path=path, progress=False)
    with pytest.raises(ValueError, match="settings differ"):  # same batches, other settings (key)
        run_batches(lm, batches, fn, key={"levels": ("neuron",)}, results_path=path, progress=False)


def test_read_layer_rejects_bad_inputs():
    hf = tiny_model("olmoe")
    lm = language_model(hf)
    view = MoEView(lm)
    for kwargs, message in (
        ({"layer": 7}, "not a MoE layer"),
        ({"layer": 1, "want": ("router_probs",)}, "unknown quantities"),
        ({"layer": 1, "mode": "drop"}, "mode must be one of"),
        ({"layer": 1, "block": [9]}, "out of range"),
    ):
        with pytest.raises((KeyError, ValueError), match=message):
            with torch.no_grad(), lm.trace(_ids()):
                read_layer(lm, view.spec, **kwargs)


@pytest.mark.parametrize("family", ["gpt_oss", "qwen3_moe", "deepseek_v2", "phimoe"])
def test_view_other_families_read_and_block(family):
    hf = tiny_model(family)
    ids = _ids()
    lm = nnsight.NNsight(hf)
    view = MoEView(lm)
    modes = ["zero", "renorm"] + ([] if family == "phimoe" else ["reroute"])
    for mode in [None] + modes:
        blocked = {index: [1] for index in view.moe_layers}
        edit = None if mode is None else (lambda m, mode=mode: nnsight_moe.block_experts(m, blocked, mode=mode))
        layout, values, logits = _oracle(hf, ids, edit)
        options = {} if mode is None else {"mode": mode}
        with torch.no_grad(), lm.trace(ids):
            views = nnsight.save({i: view.layer(i, block=blocked[i] if mode else None, **options) for i in view.moe_layers})
            out = lm.output.logits.save()
        _assert_view_equals_hooks(layout, views, values)
        torch.testing.assert_close(out, logits, atol=ATOL, rtol=0)
    if family == "phimoe":
        with pytest.raises(ValueError, match="cannot re-derive sparsemixer"):
            with torch.no_grad(), lm.trace(ids):
                view.layer(view.moe_layers[0], block=[1], mode="reroute")


def test_view_spec_from_meta_model_and_dense_model_rejected():
    from transformers import AutoModelForCausalLM

    from nnsight_moe.testing import tiny_config

    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(tiny_config("deepseek_v3"))
    assert MoEView(nnsight.NNsight(meta)).spec == MoEView(nnsight.NNsight(tiny_model("deepseek_v3"))).spec
    with pytest.raises(nnsight_moe.UnsupportedModelError, match="Supported families"):
        MoEView(nnsight.NNsight(AutoModelForCausalLM.from_config(tiny_config("llama"))))


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3", "ernie4_5_moe"])
def test_client_side_works_on_meta_weights(family):
    """On NDIF the client's model is built on the meta device: the view's spec and the recipes' batches
    must come out the same as with real weights (nothing on the client reads a weight value)."""
    from nnsight_moe.recipes.blocking import _chunks, _Data

    hf = tiny_model(family)
    with torch.device("meta"):
        meta = type(hf)(hf.config)
    assert next(meta.parameters()).is_meta
    assert moe_spec(meta) == moe_spec(hf)
    data = _Data([[5, 6, 7], [8, 9]], torch.tensor([1, 2]), ["r", "r"])
    chunk, = _chunks(meta, data, [0, 1], None, 4, "left")
    assert chunk["input_ids"].device.type == "cpu" and chunk["input_ids"].tolist() == [[5, 6, 7], [0, 8, 9]]


def test_cli_remote_ndif_needs_a_hosted_model(tmp_path):
    from nnsight_moe.models import load_traced

    with pytest.raises(ValueError, match="exists only on this machine: use --remote local"):
        load_traced("demo-moe", True)
