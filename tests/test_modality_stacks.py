"""What the hook contract covers on ERNIE-4.5-VL with vision tokens present (modality-isolated experts), measured.

The contract's hook points are the TEXT experts' (adapters/ernie4_5_vl_moe.py explains why the vision experts
have none). With vision positions in the batch (``moe_mm_token_type_ids``), the block routes only the text tokens
through ``text_moe``: the attached model stays bit-identical to HF, the text hooks hold one row per text token
(shape [1, n_text, ...]) and equal the model's own text routing, and ``hook_moe_out`` is exactly the text routed sum
(at text positions) + the unhooked ``vision_moe`` output (at vision positions) + the gated shared expert.
"""

from __future__ import annotations

import copy

import torch

import nnsight_moe
from nnsight_moe.testing import tiny_model

from helpers import capture_hooks

IDS = torch.tensor([[5, 9, 17, 33, 2, 44], [7, 8, 9, 10, 11, 12]])
VISION = torch.tensor([[0, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 0]])  # 1: an image-token position


@torch.no_grad()
def test_ernie_vl_text_hooks_with_vision_tokens_present():
    model = tiny_model("ernie4_5_vl_moe")
    reference = copy.deepcopy(model)
    seen, handles = {}, []
    for index in nnsight_moe.layout(reference).moe_layers:
        block = reference.get_submodule(nnsight_moe.layout(reference).layer(index).path)
        for name in ("text_moe", "vision_moe"):
            handles.append(getattr(block, name).register_forward_hook(
                lambda m, a, o, key=(index, name): seen.__setitem__(key, o[0].detach().clone())))
        handles.append(block.text_moe.gate.register_forward_hook(
            lambda m, a, o, index=index: seen.__setitem__((index, "indices"), o[2].clone())))
    expected = reference(IDS, moe_mm_token_type_ids=VISION).logits
    for h in handles:
        h.remove()
    assert not torch.allclose(expected, reference(IDS).logits, atol=1e-3)  # the vision experts matter here
    out = {}
    with nnsight_moe.attached(model) as handle:
        values = capture_hooks(handle, lambda: out.__setitem__("logits", model(IDS, moe_mm_token_type_ids=VISION).logits))
    assert torch.equal(out["logits"], expected)
    text = ~VISION.bool()
    n_text, d = int(text.sum()), model.config.get_text_config().hidden_size
    for index in handle.layout.moe_layers:
        path = handle.layout.layer(index).path
        indices = values[f"{path}.hook_topk_indices"]
        assert indices.shape[:2] == (1, n_text)  # one row per text token, not [b, p]
        assert torch.equal(indices[0], seen[(index, "indices")])
        moe_out = values[f"{path}.hook_moe_out"]  # [b, p, d]: every position
        assembled = torch.zeros_like(moe_out)
        assembled[text] = values[f"{path}.hook_routed_out"].reshape(n_text, d)
        assembled[~text] = seen[(index, "vision_moe")].reshape(-1, d)
        assembled += values[f"{path}.hook_shared_gate"] * values[f"{path}.hook_shared_out"]
        torch.testing.assert_close(assembled, moe_out, atol=1e-6, rtol=0)
        torch.testing.assert_close(values[f"{path}.hook_routed_out"].reshape(-1), seen[(index, "text_moe")], atol=1e-6, rtol=0)


@torch.no_grad()
def test_qwen3_omni_moe_talker_stack_hooks():
    """Qwen3-Omni-MoE's talker stack, attached on its own beside the thinker: its layout names its own layers (with
    the gated shared expert its blocks have), attaching both stacks leaves each forward bit-identical, the talker's
    hook_topk_* are its routers' own and its decomposition identities hold."""
    from transformers import Qwen3OmniMoeForConditionalGeneration

    from nnsight_moe.testing import randomize_, tiny_config

    torch.manual_seed(0)
    full = randomize_(Qwen3OmniMoeForConditionalGeneration._from_config(tiny_config("qwen3_omni_moe")).eval())
    thinker, talker = nnsight_moe.layout(full), nnsight_moe.layout(full.talker)
    assert all(layer.path.startswith("thinker.") and not layer.has_shared for layer in thinker.layers)
    assert [layer.path for layer in talker.layers] == [f"model.layers.{i}.mlp" for i in range(len(full.talker.model.layers))]
    assert all(layer.has_shared and layer.shared_gate.endswith("shared_expert_gate") for layer in talker.layers)
    embeds = torch.randn(2, 5, full.talker.config.text_config.hidden_size, generator=torch.Generator().manual_seed(0))
    expected_talker = full.talker.model(inputs_embeds=embeds).last_hidden_state
    expected_thinker = full.thinker(IDS).logits
    own, handles = {}, []
    for index in talker.moe_layers:
        handles.append(full.talker.get_submodule(talker.layer(index).router).register_forward_hook(
            lambda m, a, o, index=index: own.__setitem__(index, (o[1].clone(), o[2].clone()))))
    handle_thinker, handle_talker = nnsight_moe.attach(full), nnsight_moe.attach(full.talker)
    try:
        out = {}
        values = capture_hooks(handle_talker, lambda: out.__setitem__(
            "talker", full.talker.model(inputs_embeds=embeds).last_hidden_state))
        assert torch.equal(out["talker"], expected_talker)
        assert torch.equal(full.thinker(IDS).logits, expected_thinker)
        for index in talker.moe_layers:
            get = lambda name: values[f"model.layers.{index}.mlp.{name}"]  # noqa: E731
            weights, indices = own[index]
            assert torch.equal(get("hook_topk_indices").reshape(indices.shape), indices)
            assert torch.equal(get("hook_topk_weights").reshape(weights.shape), weights)
            routed = (get("hook_topk_weights")[..., None] * get("hook_expert_out")).sum(-2)
            torch.testing.assert_close(get("hook_routed_out"), routed, atol=1e-6, rtol=0)
            torch.testing.assert_close(get("hook_moe_out"), get("hook_routed_out") + get("hook_shared_gate")
                                       * get("hook_shared_out"), atol=1e-6, rtol=0)
    finally:
        nnsight_moe.detach(full.talker), nnsight_moe.detach(full)
        for h in handles:
            h.remove()
