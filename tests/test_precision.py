"""Precision: attaching is exact in float32, float16 and bfloat16 for every family, built natively in that dtype.

The oracle is the unmodified HF forward: attached logits must be bit-identical (HF is deterministic on
CPU), and ``hook_topk_weights`` must be the very tensor the router hands the experts (same dtype, same
values). The remote view re-derives routing with the same rule and must agree with the hooks exactly.
"""

from __future__ import annotations

import copy

import nnsight
import pytest
import torch

import nnsight_moe
from nnsight_moe.remote import MoEView
from nnsight_moe.testing import tiny_model

from helpers import capture_hooks, capture_routers

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
#: every family as the test suite builds it, plus the routing variants a config switch selects
CASES = [(family, {}) for family in nnsight_moe.supported_families()] + [
    ("cohere2_moe", {"expert_selection_fn": "sigmoid", "norm_topk_prob": True}),
    ("cohere2_moe", {"expert_selection_fn": "sigmoid", "norm_topk_prob": False}),
]


def _case_id(case):
    family, overrides = case
    return family + "".join(f"-{v}" for v in overrides.values())


def _ids(batch=2, pos=8, seed=0):
    return torch.randint(3, 128, (batch, pos), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("case", CASES, ids=_case_id)
@torch.no_grad()
def test_attach_is_exact_in_every_dtype(case, dtype):
    family, overrides = case
    model = tiny_model(family, dtype=dtype, **overrides)
    assert model.get_input_embeddings().weight.dtype == dtype
    ids = _ids()
    layout = nnsight_moe.layout(model)
    ref = model(ids).logits
    routers = capture_routers(model, layout, lambda: model(ids))
    out = {}
    with nnsight_moe.attached(model) as handle:
        values = capture_hooks(handle, lambda: out.__setitem__("logits", model(ids).logits))
    delta = (out["logits"].float() - ref.float()).abs().max().item()
    assert torch.equal(out["logits"], ref), f"{family} {dtype}: attaching changed the logits by {delta:.3g}"
    for index in layout.moe_layers:
        path = layout.layer(index).path
        hf_weights, hf_indices = routers[index]
        weights = values[f"{path}.hook_topk_weights"].reshape(hf_weights.shape)
        assert weights.dtype == hf_weights.dtype, f"layer {index}: hook_topk_weights {weights.dtype}, model {hf_weights.dtype}"
        assert torch.equal(weights, hf_weights), f"layer {index}: gate weights differ"
        assert torch.equal(values[f"{path}.hook_topk_indices"].reshape(hf_indices.shape), hf_indices)


@pytest.mark.parametrize(
    "case",
    [("ernie4_5_moe", {}), ("granitemoe", {}), ("gpt_oss", {}), CASES[-2]],
    ids=_case_id,
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=lambda d: str(d).replace("torch.", ""))
@torch.no_grad()
def test_remote_view_rederives_like_the_hooks(case, dtype):
    """Rerouting re-derives the weights on both paths: the view's weights equal the hooks' (dtype and bits)."""
    family, overrides = case
    hf = tiny_model(family, dtype=dtype, **overrides)
    ids = _ids()
    blocked = {index: [1] for index in nnsight_moe.layout(hf).moe_layers}
    reference = copy.deepcopy(hf)
    out = {}
    with nnsight_moe.attached(reference) as handle, nnsight_moe.block_experts(reference, blocked, mode="reroute"):
        values = capture_hooks(handle, lambda: out.__setitem__("logits", reference(ids).logits))
    lm = nnsight.NNsight(hf)
    view = MoEView(lm)
    with lm.trace(ids):
        views = nnsight.save({i: view.layer(i, block=blocked[i], mode="reroute") for i in view.moe_layers})
        logits = lm.output.logits.save()
    for index, quantities in views.items():
        expected = values[f"{handle.layout.layer(index).path}.hook_topk_weights"]
        assert quantities["topk_weights"].dtype == expected.dtype
        assert torch.equal(quantities["topk_weights"], expected), f"layer {index}"
        assert torch.equal(quantities["topk_indices"], values[f"{handle.layout.layer(index).path}.hook_topk_indices"])
    assert torch.equal(logits, out["logits"])
