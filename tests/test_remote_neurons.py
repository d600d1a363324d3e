"""The neuron level of remote attribution (``attribute(..., remote=...)``) against the local path.

Under ``remote="local"`` the request is serialised and run on the unmodified model exactly as for NDIF;
the neuron scores (exact, or fast: screened and selected in the trace) must equal the local rows.
"""

from __future__ import annotations

import pytest
import torch
from nnsight.intervention.backends.local import LocalSimulationBackend
from nnsight.intervention.serialization import CustomCloudUnpickler, loads
from nnsight.schema.request import RequestModel

import nnsight_moe
from nnsight_moe.recipes.attribution import LEVELS, attribute
from nnsight_moe.testing import tiny_model

from helpers import language_model

PROMPTS = [[5, 9, 17, 33, 2], [7, 8, 9], [11, 12, 13, 14, 15, 16]]
TARGETS = [3, 40, 77]
KEYS = ["prompt", "layer", "level", "head", "expert", "neuron"]


def _both(family, levels, **options):
    """(local frame, remote="local" frame) of the same attribution."""
    model = tiny_model(family)
    options = dict(levels=levels, batch_size=2, progress=False, **options)
    local = attribute(model, PROMPTS, TARGETS, **options).to_frame()
    remote = attribute(language_model(model), PROMPTS, TARGETS, remote="local", **options).to_frame()
    assert nnsight_moe.handle_of(model) is None, "the remote path attaches nothing"
    return local, remote


def _assert_same_rows(local, remote):
    assert len(local) == len(remote) > 0
    assert local.drop(columns="score").equals(remote.drop(columns="score")), "same rows, same order"
    assert (local["score"] - remote["score"]).abs().max() < 1e-5


@pytest.mark.parametrize("family", ["qwen2_moe", "olmoe", "deepseek_v3"])
@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_remote_neurons_equal_local(family, mode):
    # all levels once (neuron rows interleave with the others as locally); a small budget forces many
    # chunks of the [neurons, d] @ W_U^T computation
    levels = LEVELS if (family, mode) == ("qwen2_moe", "fast") else ("neuron",)
    local, remote = _both(family, levels, neurons=mode, fast_top=7, budget_bytes=16 * (128 + 64) * 50)
    _assert_same_rows(local, remote)
    remote = remote[remote["level"] == "neuron"]
    config = tiny_model(family).config
    layout = nnsight_moe.layout(tiny_model(family))
    units = remote.groupby(["prompt", "layer", remote["expert"] >= 0]).size()
    if mode == "fast":
        assert (units == 7).all(), "fast_top neurons per prompt, layer and kind (routed / shared or dense)"
    kinds = set(remote.groupby(["layer", remote["expert"] >= 0]).size().index)
    for i in range(config.num_hidden_layers):
        if i in layout.moe_layers:
            assert (i, True) in kinds
            assert ((i, False) in kinds) == bool(layout.layer(i).shared), f"shared-expert neurons of layer {i}"
        else:  # deepseek_v3's dense first layer
            assert (i, False) in kinds and (i, True) not in kinds


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_remote_neurons_equal_local_on_a_dense_model(mode):
    local, remote = _both("llama", ("layer", "neuron"), neurons=mode, fast_top=5)
    _assert_same_rows(local, remote)
    assert set(remote["level"]) == {"attn", "moe", "neuron"} and (remote["expert"] == -1).all()


class _Recording(LocalSimulationBackend):
    """The local simulation backend, keeping every serialised request it runs."""

    def __init__(self, model, blobs):
        LocalSimulationBackend.__init__(self, model)
        self.blobs = blobs

    def __call__(self, tracer):
        self.blobs.append(RequestModel.serialize(tracer))
        return LocalSimulationBackend.__call__(self, tracer)


class _Inventory(CustomCloudUnpickler):
    """Records the globals (module, name) a request names."""

    def __init__(self, file, persistent_objects):
        CustomCloudUnpickler.__init__(self, file, persistent_objects)
        self.globals: list = []

    def find_class(self, module, name):
        self.globals.append((module, name))
        return CustomCloudUnpickler.find_class(self, module, name)


def test_remote_neurons_ship_code_by_value_and_return_only_scores(tmp_path, monkeypatch):
    model = tiny_model("qwen2_moe")
    lm = language_model(model)
    blobs: list = []
    monkeypatch.setattr(lm, "_remote_backend", lambda *a, **k: _Recording(lm, blobs))
    path = tmp_path / "results.pt"
    attribute(lm, PROMPTS, TARGETS, levels=("neuron",), neurons="fast", fast_top=4, batch_size=3, remote="local",
              results_path=path, progress=False)
    assert len(blobs) == 1 and b"def _neuron_lpi" in blobs[0], "the trace-side code travels as source"
    kept = {}

    def unpickler(file, persistent):
        kept["u"] = _Inventory(file, persistent)
        return kept["u"]

    loads(blobs[0], lm._remoteable_persistent_objects(), unpickler=unpickler)
    server_side = {"nnsight", "torch", "transformers", "builtins", "copyreg", "functools", "types", "cloudpickle",
                   "collections", "_codecs"}
    assert {m for m, _ in kept["u"].globals if m.split(".")[0] not in server_side} == set()
    # what came back for the neuron level: [prompts, fast_top] scores and int32 ids, expert ids [prompts, k]
    from nnsight_moe.files import load_results

    result = load_results(path, "nnsight_moe.run_batches/2")[1][0]
    for layer, units in result["neuron"].items():
        for unit in units:
            assert unit["scores"].shape == (3, 4) and unit["picked"].shape == (3, 4)
            assert unit["picked"].dtype == torch.int32 and unit["ids"].shape[0] == 3


def test_remote_neurons_reject_bad_inputs():
    model = tiny_model("olmoe")
    lm = language_model(model)
    with pytest.raises(ValueError, match="neurons must be 'exact' or 'fast', got 'fastest'"):
        attribute(lm, PROMPTS, TARGETS, levels=("neuron",), neurons="fastest", remote="local", progress=False)
    with pytest.raises(ValueError, match="fast_top must be an integer >= 0"):
        attribute(lm, PROMPTS, TARGETS, levels=("neuron",), neurons="fast", fast_top=-1, remote="local",
                  progress=False)
    # dense MLPs of any shape (gated or not) are read at their down_proj input: tests/test_frontends.py (nemotron_h)
