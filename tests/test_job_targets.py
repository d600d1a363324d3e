"""The main job's target choice: gold object vs the model's own top-1 prediction, and --only-correct."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner

from nnsight_moe import demo
from nnsight_moe.cli import main
from nnsight_moe.data import bundled, bundled_dir, encode_facts
from nnsight_moe.job import Job


def _job(**kw):
    model, tok = demo.load("demo-moe")
    relations = bundled(["country_capital_city"])
    encoded = encode_facts(tok, relations[0].facts(0)[:12])
    return Job("demo-moe", model, tok, relations, encoded, batch_size=7, **kw), model, tok


@torch.no_grad()
def _brute(model, tok, prompts):
    logits = torch.stack([model(**tok(p, return_tensors="pt")).logits[0, -1] for p in prompts])
    return logits


def test_job_selection_against_a_plain_forward():
    job, model, tok = _job(target="prediction", only_correct=False)
    logits = _brute(model, tok, job.gold.prompts)
    gold = torch.tensor(job.gold.targets)
    ranks, top1 = job.predictions()
    assert top1.tolist() == logits.argmax(-1).tolist()
    assert ranks.tolist() == ((logits > logits.gather(1, gold[:, None])).sum(-1) + 1).tolist()
    assert job.encoded.targets == top1.tolist() and job.encoded.prompts == job.gold.prompts
    # a perturbed gold set: only the facts whose gold target is the top-1 survive --only-correct
    job2, _, _ = _job(only_correct=True)
    flipped = list(job2.gold.targets)
    flipped[0] = (flipped[0] + 1) % len(tok)  # fact 0 is now answered "wrong"
    job2.gold.targets = flipped
    kept = job2.encoded
    assert job2.gold.facts[0] not in kept.facts and len(kept) == int((job2.predictions()[0] == 1).sum())
    assert all(t == int(top1[job2.gold.facts.index(f)]) for f, t in zip(kept.facts, kept.targets))
    assert job2.selection()["n_correct"] == {"country_capital_city": len(kept)}
    with pytest.raises(ValueError, match="target must be one of"):
        _job(target="top1")


def test_cli_target_prediction_only_correct_recorded_in_results(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(bundled_dir() / "country_capital_city.json", data)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["run", "--data", str(data), "--out", str(out), "--quick",
                                       "--target", "prediction", "--only-correct"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    selection = results["data"]["selection"]
    assert selection["target"] == "prediction" and selection["only_correct"] is True
    baseline = {row["relation"]: row for row in results["sections"]["baseline"]["metrics"]}
    assert selection["n_facts"] == baseline["all"]["correct"] == selection["n_correct"]["country_capital_city"]
    model = results["sections"]["attribution"]["models"][0]
    assert model["target"] == "prediction" and model["only_correct"] is True
    assert model["summary"]["MRR"] == 1.0  # the model's own prediction always has rank 1
    bad = CliRunner().invoke(main, ["run", "--out", str(out), "--target", "nope"])
    assert bad.exit_code != 0 and "'nope' is not one of 'gold', 'prediction'" in bad.output
