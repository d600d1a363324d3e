"""The `nnsight-moe` command line and the main job on the demo model."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time

import pytest
import torch
from click.testing import CliRunner

import nnsight_moe
from nnsight_moe.cli import main
from nnsight_moe.report import validate
from test_report_json import strict_loads


@pytest.fixture(scope="module")
def job_dir(tmp_path_factory):
    """One full default run of the main job on demo-moe, shared by the tests below."""
    out = tmp_path_factory.mktemp("job") / "out"
    start = time.time()
    result = CliRunner().invoke(main, ["run", "--out", str(out)], catch_exceptions=False)
    elapsed = time.time() - start
    assert result.exit_code == 0, result.output
    return out, elapsed


def test_families_lists_supported():
    result = CliRunner().invoke(main, ["families"])
    assert result.exit_code == 0
    assert result.output.split() == nnsight_moe.supported_families()


def test_inspect_demo():
    result = CliRunner().invoke(main, ["inspect", "--model", "demo-moe"])
    assert result.exit_code == 0, result.output
    assert "qwen2_moe" in result.output and "hook_topk_weights" in result.output
    assert "shared d=" in result.output


def test_run_writes_valid_results_and_report(job_dir):
    out, elapsed = job_dir
    assert elapsed < 180, f"the main job took {elapsed:.0f} s on the demo model (limit 180 s)"
    results = strict_loads((out / "results.json").read_text())  # strict JSON: no NaN / Infinity
    validate(results)
    assert results["model"]["family"] == "qwen2_moe" and results["model"]["has_shared"]
    assert results["data"]["n_facts"] >= 6 * 40
    assert results["plots"], "the report promises plots"
    page = (out / "report.html").read_text()
    for plot in results["plots"]:
        assert (out / plot["file"]).stat().st_size > 1000
        assert f"id='plot-{plot['section']}-{plot['name']}'" in page
    baseline = results["sections"]["baseline"]["metrics"]
    assert baseline[-1]["relation"] == "all" and baseline[-1]["MRR"] >= 0.9


def test_validate_names_missing_key(job_dir):
    results = json.loads((job_dir[0] / "results.json").read_text())
    del results["model"]["top_k"]
    with pytest.raises(ValueError, match="model is missing 'top_k'"):
        validate(results)


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed (.ci/run installs it)")
def test_report_renders_in_headless_chromium(job_dir, tmp_path):
    out, _ = job_dir
    results = json.loads((out / "results.json").read_text())
    proc = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
         "--virtual-time-budget=5000", "--dump-dom", (out / "report.html").resolve().as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    console_errors = [line for line in proc.stderr.splitlines() if "CONSOLE" in line and "rror" in line]
    assert not console_errors, console_errors
    match = re.search(r'data-plots-rendered="(\d+)"', proc.stdout)
    assert match, "the report's load script did not run"
    assert int(match.group(1)) == len(results["plots"]), "every plot image decoded and has a size"
    view = re.search(r'data-token-view-rendered="(\d+)"', proc.stdout)  # the per-token routing view drew
    assert view and int(view.group(1)) > 0


def test_bad_model_and_out(tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["run", "--model", "no-such-model-xyz", "--out", str(tmp_path / "a")])
    assert result.exit_code != 0 and "no-such-model-xyz" in result.output
    result = runner.invoke(main, ["run", "--model", str(tmp_path / "missing" / "dir"), "--out", str(tmp_path / "b")])
    assert result.exit_code != 0 and "no such model directory" in result.output
    blocker = tmp_path / "file"
    blocker.write_text("x")
    start = time.time()
    result = runner.invoke(main, ["run", "--out", str(blocker / "sub")])
    assert result.exit_code != 0 and "not a writable directory" in result.output
    assert time.time() - start < 5, "the --out check comes before any compute"


def test_bad_dataset_and_unknown_targets(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"name": "x", "prompt_templates": ["{} is"]}))
    result = CliRunner().invoke(main, ["run", "--data", str(bad), "--out", str(tmp_path / "o1")])
    assert result.exit_code != 0 and "bad.json" in result.output and "samples" in result.output

    good = json.loads((nnsight_moe.data.bundled_dir() / "country_capital_city.json").read_text())
    good["samples"] = good["samples"][:5] + [{"subject": "France", "object": "Zzyzxville"}]
    data = tmp_path / "small.json"
    data.write_text(json.dumps(good))
    out = tmp_path / "o2"
    result = CliRunner().invoke(main, ["run", "--data", str(data), "--out", str(out), "--quick"])
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert [s["object"] for s in results["data"]["skipped"]] == ["Zzyzxville"] * len(good["prompt_templates"])
    assert results["data"]["relations"][0]["n_skipped"] == len(good["prompt_templates"])


def test_run_remote_local(tmp_path):
    """--remote local: every section runs through nnsight on the unmodified model."""
    out = tmp_path / "remote"
    result = CliRunner().invoke(main, ["run", "--remote", "local", "--quick", "--out", str(out)])
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    validate(results)
    attribution = results["sections"]["attribution"]
    assert attribution["models"][0]["summary"]["MRR"] == 1.0
    assert "correlation" in results["sections"]["head_expert"]
    baseline = results["sections"]["baseline"]  # ranks and expert load computed in the trace too
    assert baseline["metrics"][-1]["MRR"] == 1.0
    from nnsight_moe import data as relation_data
    from nnsight_moe.job import Job, routing_load

    model, tokenizer = nnsight_moe.demo.load("demo-moe")
    relations = relation_data.bundled()
    encoded = relation_data.encode_facts(tokenizer, [f for r in relations for f in r.facts()])
    local_load = routing_load(Job("demo-moe", model, tokenizer, relations, encoded))
    assert torch.tensor(baseline["expert_load"]) == pytest.approx(local_load, abs=1e-6)
    blocking = results["sections"]["blocking"]
    assert blocking["sweep"]["original"]["all"]["mrr"] == 1.0 and blocking["configurations"]["rows"]
    assert nnsight_moe.handle_of(nnsight_moe.demo.load("demo-moe")[0]) is None


def test_analysis_sections_in_the_job_and_replotted_from_results_json(job_dir):
    """The routing, fidelity, lenses and super-expert sections are in results.json; their plots re-plot from it."""
    from nnsight_moe.recipes.replot import replot

    out, _ = job_dir
    results = strict_loads((out / "results.json").read_text())
    sections = results["sections"]
    stats = sections["routing"]["stats"]
    assert stats["n_tokens"] > 0 and len(stats["load"]) == len(results["model"]["moe_layers"])
    assert sections["routing"]["specialisation"]["summary"]["tested"] > 0 and "generation" in sections["routing"]
    assert {r["comparison"] for r in sections["fidelity"]["rows"]} >= {"bfloat16"}
    assert any(r["source"] == "prompts" for r in sections["lenses"]["rows"])
    assert sections["super_experts"]["maxima"]["rows"]
    figures = replot(out / "results.json")
    expected = {(p["section"], p["name"]) for p in results["plots"] if p["section"] in figures}
    assert {(s, n) for s, f in figures.items() for n in f} == expected and expected
    assert "class=\"token-view\"" in (out / "report.html").read_text()
