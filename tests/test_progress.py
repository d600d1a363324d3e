"""Progress bars carry the labels of what is running; the main job prints one line per step."""

from __future__ import annotations

import io

import nnsight_moe.progress as progress


def test_labels_nest_and_prefix_bars(monkeypatch):
    monkeypatch.setattr(progress, "_interactive", lambda: True)
    stream = io.StringIO()
    with progress.label("[3/4 blocking]"), progress.label("sweep: relation 2/7 country_language"):
        assert progress.labels() == "[3/4 blocking] | sweep: relation 2/7 country_language"
        bar = progress.bar(range(3), "zero: stacked conditions x batches", file=stream)
        assert bar.desc == "[3/4 blocking] | sweep: relation 2/7 country_language | zero: stacked conditions x batches"
        list(bar)
    assert progress.labels() == ""


def test_bars_are_off_in_logs(monkeypatch):
    monkeypatch.setattr(progress, "_interactive", lambda: False)
    assert progress.bar(range(3), "x").disable


def test_job_prints_numbered_steps_and_notes_skipped_sections(tmp_path, capsys):
    from nnsight_moe.job import run_job
    from nnsight_moe.report import validate

    results = run_job("demo-dense", out=tmp_path, quick=True)
    validate(results)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    from nnsight_moe.job import RECIPE_SECTIONS

    n = 1 + len(RECIPE_SECTIONS)  # the baseline, then every recipe section (a start and an end line each)
    assert [line.split("]")[0] + "]" for line in lines] == [f"[{i}/{n}]" for i in range(1, n + 1) for _ in (0, 1)]
    for name in ("blocking", "head_expert"):
        assert "dense" in results["sections"][name]["skipped"]
    assert "(skipped)" in (tmp_path / "report.html").read_text()
