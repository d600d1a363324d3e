"""The command line starts without the heavy stack; bad model names fail fast and name the demo models."""

from __future__ import annotations

import json
import subprocess
import sys

from click.testing import CliRunner

from nnsight_moe.cli import main

HEAVY = ("torch", "transformers", "transformer_lens", "nnsight")

_PROBE = """
import json, sys
from nnsight_moe.cli import main
out = {}
for args in (["--help"], ["--version"], ["runn"], ["run", "--batch-size", "0"], ["run", "--help"],
             ["run", "--model", "demo_moe", "--out", sys.argv[1]], ["inspect", "--model", "./no/such/dir"]):
    try:
        main(args, prog_name="nnsight-moe")
    except SystemExit as exit:
        code = exit.code
    out[" ".join(args)] = {"code": code, "heavy": sorted(m for m in %r if m in sys.modules)}
print(json.dumps(out))
""" % (HEAVY,)


def test_cli_answers_without_importing_torch(tmp_path):
    """--help, --version, usage errors and a bad model name are answered before torch is imported."""
    proc = subprocess.run([sys.executable, "-c", _PROBE, str(tmp_path / "out")], capture_output=True, text=True,
                          timeout=120, env={"HF_HUB_OFFLINE": "1", "PATH": ""})
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert results["--help"]["code"] == 0 and results["--version"]["code"] == 0
    assert results["runn"]["code"] == 2 and results["run --batch-size 0"]["code"] == 2
    assert results["run --model demo_moe --out " + str(tmp_path / "out")]["code"] == 1
    assert results["inspect --model ./no/such/dir"]["code"] == 1
    for args, result in results.items():
        assert result["heavy"] == [], f"`nnsight-moe {args}` imported {result['heavy']}"
    assert "did you mean 'demo-moe'" in proc.stderr


def test_package_import_is_light_and_api_still_resolves():
    code = ("import sys, nnsight_moe; light = not any(m in sys.modules for m in %r); "
            "import nnsight_moe.attach, nnsight_moe.layout; "
            "print(light, callable(nnsight_moe.attach), callable(nnsight_moe.layout), "
            "nnsight_moe.block_experts.__module__, nnsight_moe.tl.__name__)" % (HEAVY,))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["True", "True", "True", "nnsight_moe.interventions", "nnsight_moe.tl"]


def test_attach_registers_both_frontends_without_the_package_api():
    """`from nnsight_moe.attach import attach` alone still exposes the hook points to nnsight."""
    code = (
        "import torch\n"
        "from nnsight import NNsight\n"
        "from nnsight_moe.attach import attach, FRONTENDS\n"
        "from nnsight_moe.testing import tiny_model\n"
        "lm = NNsight(tiny_model('qwen2_moe'))\n"
        "attach(lm)\n"
        "with lm.trace(torch.randint(0, 100, (1, 5))):\n"
        "    w = lm.model.layers[0].mlp.hook_topk_weights.output.save()\n"
        "print(sorted(f.__module__ for f in FRONTENDS), tuple(w.shape))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "['nnsight_moe.nnsight_frontend', 'nnsight_moe.tl']" in proc.stdout and "(1, 5, 2)" in proc.stdout


def test_unknown_model_offline_fails_at_once_with_the_demo_names(tmp_path):
    runner = CliRunner()
    for command in (["inspect", "--model", "Demo_MoE"], ["run", "--model", "demo_moe", "--out", str(tmp_path)]):
        result = runner.invoke(main, command)
        assert result.exit_code == 1
        assert "did you mean 'demo-moe'" in result.output and "demo-dense" in result.output
        assert "HF_HUB_OFFLINE=1" in result.output
    result = runner.invoke(main, ["inspect", "--model", "someone/no-such-model"])
    assert result.exit_code == 1 and "demo-moe or demo-dense" in result.output and "did you mean" not in result.output
