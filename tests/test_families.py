"""Family coverage: every MoE family of the installed transformers is supported, excluded or listed as
not yet supported; families added for issue #14 are exact in bfloat16; detection by structure."""

from __future__ import annotations

import pytest
import torch

import nnsight_moe
from nnsight_moe import coverage
from nnsight_moe.adapters import adapter_for
from nnsight_moe.testing import tiny_config, tiny_model

#: Families added by issue #14 (the float32 core tests run on them through tests/test_core.py).
ADDED = ["aria", "deepseek_ocr2", "dots3_note", "glm4v_moe", "glm5_next", "hy_v4_vl", "lara_mini", "lfm2_moe",
         "mistral4", "mistral_large4", "openai_privacy_filter", "qwen3_vl_moe", "sarvam_mla", "sarvam_moe", "unlimited_ocr"]
#: Families whose router keeps bf16 arithmetic (mistral4, lfm2_moe) or casts weights to the hidden states'
#: dtype (lara_mini): the contract's float32 weights differ from the model's by bf16 rounding.
BF16_ROUNDED = {"lara_mini", "lfm2_moe", "mistral4"}


def test_every_moe_package_is_supported_excluded_or_listed():
    rows = coverage.coverage()
    unlisted = [(package, why) for package, status, why in rows if status == "unlisted"]
    assert not unlisted, (
        f"MoE packages in the installed transformers that nnsight-moe neither supports nor lists: {unlisted}; "
        "add an adapter, or an entry to nnsight_moe.coverage.NOT_YET / EXCLUDED with the reason"
    )
    packages = coverage.moe_packages()
    stale = sorted((set(coverage.EXCLUDED) | set(coverage.NOT_YET)) - set(packages))
    assert not stale, f"coverage tables name packages that are not MoE packages of this transformers: {stale}"
    supported = {package for package, status, _ in rows if status == "supported"}
    assert not supported & (set(coverage.NOT_YET) | set(coverage.EXCLUDED)), "a supported package is still listed"
    assert not set(coverage.NOT_YET) & set(coverage.EXCLUDED)


def test_scan_finds_moe_by_structure_not_by_name():
    packages = coverage.moe_packages()
    # own MoE classes, older families without the experts interface, and packages running another's classes
    for package in ("mixtral", "deepseek_v3", "dbrx", "jetmoe", "llama4", "switch_transformers"):
        assert package in packages
    assert "runs DeepseekV3ForCausalLM (deepseek_v3)" in packages["sarvam_mla"]
    assert "text model is deepseek_v3" in packages["kimi_k25"]
    for dense in ("llama", "qwen2", "gpt2", "mistral"):
        assert dense not in packages
    # every registered family's package is found by the scan
    served = {family for _, status, family in coverage.coverage() if status == "supported"}
    assert served == set(nnsight_moe.supported_families())


@pytest.mark.parametrize("family", ADDED)
@torch.no_grad()
def test_added_families_bfloat16(family):
    """bf16 attached = unattached logits: bit-identical, or within bf16 rounding where the router rounds."""
    model = tiny_model(family, dtype=torch.bfloat16)
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    ref = model(ids).logits
    with nnsight_moe.attached(model):
        out = model(ids).logits
    if family in BF16_ROUNDED:
        assert (out.float() - ref.float()).abs().max().item() <= 0.05 * ref.float().abs().max().item()
    else:
        assert torch.equal(out, ref)


def test_detection_by_structure():
    """A config with its own model_type on a supported family's modeling classes is served by that family."""
    from transformers import DeepseekV3ForCausalLM

    config = tiny_config("deepseek_v3")
    config.model_type = "my_deepseek_finetune"
    model = DeepseekV3ForCausalLM(config)
    assert adapter_for(model).name == "deepseek_v3"
    assert nnsight_moe.layout(model).moe_layers == [1, 2]
    # sarvam_mla is DeepseekV3ForCausalLM: its own adapter, and the same layout as DeepSeek-V3
    sarvam = tiny_model("sarvam_mla")
    assert type(sarvam).__name__ == "DeepseekV3ForCausalLM" and adapter_for(sarvam).name == "sarvam_mla"
