"""`nnsight-moe check` / `check_routing`: passes where the hooks are right, fails (exit 1) where they are not."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from click.testing import CliRunner

import nnsight_moe
from nnsight_moe import adapters
from nnsight_moe.adapters.base import Adapter
from nnsight_moe.check import check_routing
from nnsight_moe.cli import main
from nnsight_moe.routing import Routing
from nnsight_moe.testing import tiny_model

FAMILIES = ["olmoe", "deepseek_v3", "gpt_oss", "ernie4_5_moe", "granitemoe"]


def _char_tokenizer():
    """A character-level tokenizer over printable ASCII (ids 3..97, within the tiny models' 128)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "<unk>": 2} | {chr(c): c - 29 for c in range(32, 127)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", padding_side="left")


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """Tiny checkpoints of FAMILIES (and qwen2_moe), saved as a user's model directory with a tokenizer."""
    dirs = {}
    for family in FAMILIES + ["qwen2_moe"]:
        path = tmp_path_factory.mktemp(family)
        tiny_model(family).save_pretrained(path)
        _char_tokenizer().save_pretrained(path)
        dirs[family] = path
    return dirs


def test_check_passes_on_demo_moe():
    result = CliRunner().invoke(main, ["check", "--model", "demo-moe", "--dtype", "bfloat16"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "routing check: qwen2_moe, bfloat16" in out and "PASS: every identity holds" in out
    assert "attached vs unattached: max |dlogit| = 0 " in out  # deterministic on CPU: bit-identical
    assert "top-k≠ float32" in out and "top-k≠ eager" in out
    assert sum(line.strip().startswith(tuple("0123")) for line in out.splitlines()) == 4  # one row per MoE layer


@pytest.mark.parametrize("family", FAMILIES)
def test_check_passes_on_tiny_checkpoints(model_dirs, family):
    dtype = "bfloat16"
    result = CliRunner().invoke(main, ["check", "--model", str(model_dirs[family]), "--dtype", dtype])
    assert result.exit_code == 0, result.output
    assert f"routing check: {family}, {dtype}" in result.output and "PASS" in result.output


@pytest.mark.parametrize("family", FAMILIES)
def test_check_routing_function(family):
    model = tiny_model(family, dtype=torch.float16)
    ids = torch.randint(3, 128, (2, 8), generator=torch.Generator().manual_seed(1))
    report = check_routing(model, ids)
    assert nnsight_moe.handle_of(model) is None, "the model is left unattached"
    handle = nnsight_moe.attach(model)
    with pytest.raises(ValueError, match="detach it first"):
        check_routing(model, ids)
    assert report.ok, report.failures()
    assert report.max_dlogit == 0.0 and report.dtype == "float16"
    assert [layer.layer for layer in report.layers] == list(handle.layout.moe_layers)
    for layer in report.layers:
        assert layer.router_indices_equal and layer.hook_dtype == layer.router_dtype
        assert set(layer.flips) == {"float32", "eager", "batched_mm"}
        assert all(0.0 <= share <= 1.0 for share in layer.flips.values())
    frame = report.to_frame()
    assert len(frame) == len(report.layers) and "flips_float32" in frame
    handle.detach()


def _wrong_rule(block, router, config) -> Routing:
    """A test double with the wrong routing rule for qwen2_moe: renormalises its top-k weights (it does not)."""
    return Routing(n_experts=router.num_experts, top_k=router.top_k, scoring="softmax", normalize=True, cast_weights=True)


def test_check_fails_on_a_wrong_routing_rule(model_dirs, monkeypatch):
    right = adapters.adapter_for(tiny_model("qwen2_moe"))
    assert not tiny_model("qwen2_moe").config.norm_topk_prob
    broken: Adapter = dataclasses.replace(right, routing=_wrong_rule)
    monkeypatch.setitem(adapters._REGISTRY, "qwen2_moe", broken)
    result = CliRunner().invoke(main, ["check", "--model", str(model_dirs["qwen2_moe"])])
    assert result.exit_code == 1, result.output
    assert "FAIL" in result.output
    assert "hook_topk_weights differ from the router's" in result.output
    assert "attached logits differ from the unattached model's" in result.output
    monkeypatch.undo()
    result = CliRunner().invoke(main, ["check", "--model", str(model_dirs["qwen2_moe"])])
    assert result.exit_code == 0, result.output


def test_check_errors(model_dirs):
    result = CliRunner().invoke(main, ["check", "--model", "demo-dense"])
    assert result.exit_code != 0 and "Supported families" in result.output
    with pytest.raises(ValueError, match="needs input_ids, or prompts with a tokenizer"):
        check_routing(tiny_model("olmoe"))
    big = _char_tokenizer()
    model = tiny_model("olmoe", vocab_size=64)
    with pytest.raises(ValueError, match="produced id .* vocabulary has 64 entries"):
        check_routing(model, tokenizer=big)


@pytest.mark.parametrize("family", ["dbrx", "llama4"])
def test_check_routing_reads_the_selection_the_model_computes(family):
    """DBRX (its block routes: the selection is the experts' arguments) and Llama 4 (dense sigmoid scores, its own
    top-k of the logits): the check and router_indices (fidelity's unattached reading) see the model's selection."""
    from nnsight_moe.check import router_indices

    from helpers import capture_hooks

    model = tiny_model(family, dtype=torch.float16)
    ids = torch.randint(3, 128, (2, 8), generator=torch.Generator().manual_seed(1))
    report = check_routing(model, ids)
    assert report.ok, report.failures()
    assert all(layer.router_indices_equal for layer in report.layers)
    layout = nnsight_moe.layout(model)
    unattached = router_indices(model, layout, {"input_ids": ids})
    with nnsight_moe.attached(model) as handle:
        values = capture_hooks(handle, lambda: model(ids))
    for index in layout.moe_layers:
        assert torch.equal(unattached[index], values[f"{layout.layer(index).path}.hook_topk_indices"])
