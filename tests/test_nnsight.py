"""nnsight frontend: hook points as envoys on NNsight / LanguageModel wrappers of attached HF models."""

from __future__ import annotations

import copy

import nnsight
import pytest
import torch

import nnsight_moe
from nnsight_moe.testing import tiny_model

from helpers import capture_hooks, language_model

FAMILIES = ["qwen2_moe", "olmoe", "mixtral", "deepseek_v3", "inkling_text", "zaya"]  # + router gammas, a skip expert
ATOL = 1e-5


def _ids(batch=2, pos=6, seed=0):
    return torch.randint(3, 128, (batch, pos), generator=torch.Generator().manual_seed(seed))


def _blocks(lm, layer):
    path = nnsight_moe.layout(lm).layer(layer).path
    envoy = lm
    for part in path.split("."):
        envoy = envoy[int(part)] if part.isdigit() else getattr(envoy, part)
    return envoy


@pytest.mark.parametrize("family", FAMILIES)
def test_hook_values_through_nnsight_equal_hf_hooks(family):
    hf = tiny_model(family)
    reference = copy.deepcopy(hf)
    ref_handle = nnsight_moe.attach(reference)
    ids = _ids()
    expected = capture_hooks(ref_handle, lambda: reference(ids))

    lm = nnsight.NNsight(hf)
    handle = nnsight_moe.attach(lm)
    assert handle.layout.moe_layers
    saved = {}
    with torch.no_grad(), lm.trace(ids):
        for path in expected:  # capture order = execution order, which nnsight requires
            block_path, name = path.rsplit(".", 1)
            saved[path] = getattr(lm.get(block_path), name).output.save()
    assert set(saved) == set(expected)
    for name, value in saved.items():
        torch.testing.assert_close(value, expected[name], atol=ATOL, rtol=0, msg=name)


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3"])
def test_setting_topk_weights_equals_block_experts_zero(family):
    hf = tiny_model(family)
    lm = nnsight.NNsight(hf)
    layout = nnsight_moe.attach(lm).layout
    layer, blocked = layout.moe_layers[-1], [0, 3]
    ids = _ids()
    with torch.no_grad():
        with nnsight_moe.block_experts(hf, {layer: blocked}, mode="zero"):
            expected = hf(ids).logits
        plain = hf(ids).logits
        with lm.trace(ids):
            point = _blocks(lm, layer).hook_topk_weights
            indices = _blocks(lm, layer).hook_topk_indices.output
            hit = (indices[..., None] == torch.tensor(blocked)).any(-1)
            point.output = point.output.masked_fill(hit, 0.0)
            logits = lm.output.logits.save()
    assert (expected - plain).abs().max() > 1e-3, "blocking these experts changes the logits"
    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", ["olmoe", "deepseek_v3"])
def test_grad_of_expert_out_matches_torch_autograd(family):
    hf = tiny_model(family)
    reference = copy.deepcopy(hf)
    ref_handle = nnsight_moe.attach(reference)
    ids = _ids()
    layer = ref_handle.layout.moe_layers[0]
    point = ref_handle.block(layer).hook_expert_out
    kept = {}

    def keep(tensor, hook):
        tensor.retain_grad()
        kept["out"] = tensor
        return tensor

    point.add_hook(keep)
    reference(ids).logits[:, -1, 5].sum().backward()
    point.remove_hooks()
    expected = kept["out"].grad

    lm = nnsight.NNsight(hf)
    nnsight_moe.attach(lm)
    with lm.trace(ids):
        out = _blocks(lm, layer).hook_expert_out.output
        target = lm.output.logits[:, -1, 5].sum()
        with target.backward():
            grad = out.grad.save()
    assert expected.abs().max() > 0
    torch.testing.assert_close(grad, expected, atol=1e-6, rtol=1e-4)


def test_two_invokes_get_their_own_rows():
    hf = tiny_model("olmoe")
    lm = language_model(hf)
    nnsight_moe.attach(lm)
    first, second = "w5 w9 w20 w7", "w40 w41 w42 w100 w17"
    with torch.no_grad():
        with lm.trace() as tracer:
            with tracer.invoke(first):
                a = lm.model.layers[1].mlp.hook_topk_weights.output.save()
                a_out = lm.model.layers[1].mlp.hook_expert_out.output.save()
            with tracer.invoke(second):
                b_idx = lm.model.layers[1].mlp.hook_topk_indices.output.save()
                b = lm.model.layers[1].mlp.hook_topk_weights.output.save()
        with lm.trace(first):
            a_alone = lm.model.layers[1].mlp.hook_topk_weights.output.save()
            a_out_alone = lm.model.layers[1].mlp.hook_expert_out.output.save()
        with lm.trace(torch.tensor([[40, 41, 42, 100, 17]])):
            b_idx_alone = lm.model.layers[1].mlp.hook_topk_indices.output.save()
            b_alone = lm.model.layers[1].mlp.hook_topk_weights.output.save()
    assert a.shape[:2] == (1, 5) and b.shape[:2] == (1, 5)  # padded to the longer prompt
    # the second prompt is unpadded in the batch: identical rows
    torch.testing.assert_close(b, b_alone, atol=ATOL, rtol=0)
    assert torch.equal(b_idx, b_idx_alone)
    # the first is left-padded by one: its real tokens are its last 4 positions
    torch.testing.assert_close(a[:, -4:], a_alone, atol=1e-4, rtol=0)
    torch.testing.assert_close(a_out[:, -4:], a_out_alone, atol=1e-4, rtol=0)


def test_attach_is_idempotent_and_detach_removes_envoys():
    hf = tiny_model("qwen2_moe")
    lm = nnsight.NNsight(hf)
    handle = nnsight_moe.attach(lm)
    again = nnsight_moe.attach(lm)
    assert again is handle
    block = lm.model.layers[1].mlp
    names = [name for name, _ in block._named_children()]
    assert names.count("hook_topk_weights") == 1
    assert "hook_shared_gate" in names
    handle.detach()
    assert not nnsight_moe.handle_of(lm)
    assert not any(name.startswith("hook_") for name, _ in block._named_children())
    assert "hook_topk_weights" not in block.__dict__
    ids = _ids()
    with torch.no_grad(), lm.trace(ids):
        logits = lm.output.logits.save()
    torch.testing.assert_close(logits, hf(ids).logits.detach(), atol=0, rtol=0)
    # attach again after detach works
    nnsight_moe.attach(lm)
    with torch.no_grad(), lm.trace(ids):
        w = lm.model.layers[1].mlp.hook_topk_weights.output.save()
    assert w.shape == (2, 6, 2)


def test_non_nnsight_objects_are_ignored():
    hf = tiny_model("mixtral")
    handle = nnsight_moe.attach(hf)
    from nnsight_moe.nnsight_frontend import expose_hook_points, is_nnsight_model

    assert not is_nnsight_model(hf)
    expose_hook_points(hf, handle)  # no error, no effect
    assert handle._on_detach == []
