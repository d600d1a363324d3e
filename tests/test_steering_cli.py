"""`nnsight-moe steer` and the main job's steering section."""

from __future__ import annotations

import json
import subprocess
import sys

from click.testing import CliRunner

from nnsight_moe.cli import main

_PROBE = """
import json, sys
from nnsight_moe.cli import main
out = {}
for args in (["steer", "--help"], ["steer", "--top", "0"], ["steer", "--model", "demo_moe"]):
    try:
        main(args, prog_name="nnsight-moe")
    except SystemExit as exit:
        code = exit.code
    out[" ".join(args)] = {"code": code, "heavy": sorted(m for m in ("torch", "transformers", "nnsight") if m in sys.modules)}
print(json.dumps(out))
"""


def test_steer_help_and_usage_errors_without_torch():
    proc = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=120,
                          env={"HF_HUB_OFFLINE": "1", "PATH": ""})
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert results["steer --help"]["code"] == 0 and results["steer --top 0"]["code"] == 2
    assert results["steer --model demo_moe"]["code"] == 1 and "did you mean 'demo-moe'" in proc.stderr
    for args, result in results.items():
        assert result["heavy"] == [], f"`nnsight-moe {args}` imported {result['heavy']}"


def test_steer_on_the_demo_local_and_remote_local(tmp_path):
    args = ["steer", "--per-relation", "16", "--seeds", "2", "--top", "2"]
    local = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "local.json")], catch_exceptions=False)
    assert local.exit_code == 0, local.output
    assert "[toward]" in local.output and "[suppress]" in local.output and "steered - random" in local.output
    remote = CliRunner().invoke(main, [*args, "--remote", "local", "--out", str(tmp_path / "remote.json")],
                                catch_exceptions=False)
    assert remote.exit_code == 0, remote.output
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("local", "remote"))
    assert a["meta"]["experts"] == b["meta"]["experts"]
    for goal in ("toward", "suppress"):
        for x, y in zip(a["results"][goal]["summary"], b["results"][goal]["summary"]):
            assert abs(x["delta_logprob"] - y["delta_logprob"]) < 1e-4


def test_steer_bad_relation_names_the_available_ones():
    result = CliRunner().invoke(main, ["steer", "--behaviour", "capitals"])
    assert result.exit_code == 1 and "relation 'capitals' is not in the bundled relations" in result.output
    assert "country_capital_city" in result.output


def test_section_without_shared_subjects_runs_suppress_only():
    from nnsight_moe import data, demo
    from nnsight_moe.job import Job
    from nnsight_moe.recipes import steering as recipe

    model, tok = demo.load("demo-moe")
    relations = data.bundled(["country_capital_city", "object_superclass"])
    encoded = data.encode_facts(tok, [f for r in relations for f in r.facts()])
    job = Job("demo-moe", model, tok, relations, encoded, quick=True)
    section = recipe.section(job)
    assert list(section.data["results"]) == ["suppress"] and section.data["meta"]["behaviour"] == "country_capital_city"
    assert section.figures and "suppress: held-out effect vs random experts" in section.tables
    found = recipe.relation_steering(model, encoded, "country_capital_city", "object_superclass", relations=relations,
                                     tokenizer=tok, top=1, seeds=1, per_relation=8, n_boot=20, permutations=20,
                                     strict=False)
    assert "needs shared subjects" in found.meta["skipped"]["toward"] and "skipped" in found.text()
