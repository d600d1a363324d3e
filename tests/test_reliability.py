"""Reliability and security (issue 15): files that cannot run code, refused resumes, atomic writes,
non-finite logits, user hooks kept, clear errors for hostile inputs, concurrent use."""

from __future__ import annotations

import errno
import functools
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch

import nnsight_moe
from nnsight_moe import files
from nnsight_moe.files import ResultsFileError
from nnsight_moe.remote import MoEView, run_batches
from nnsight_moe.testing import tiny_model

from helpers import language_model

FORMAT = "nnsight_moe.run_batches/2"


def _ids(batch=2, pos=5, seed=0):
    return torch.randint(3, 128, (batch, pos), generator=torch.Generator().manual_seed(seed))


def _scores(view, model, batch):
    """Last-position router scores of every MoE layer (runs inside the trace)."""
    return {i: view.layer(i, want=("router_scores",))["router_scores"][:, -1] for i in view.moe_layers}


def _weights(view, model, batch):
    """Another function over the same batches: last-position gate weights."""
    return {i: view.layer(i, want=("topk_weights",))["topk_weights"][:, -1] for i in view.moe_layers}


def _run(lm, batches, path, fn=_scores, **kwargs):
    return run_batches(lm, batches, functools.partial(fn, MoEView(lm)), results_path=path, progress=False, **kwargs)


class _Payload:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# ------------------------------------------------------------------ 1. no code execution from files
def test_malicious_pickle_results_file_runs_no_code(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "results.pt"
    torch.save({"format": "nnsight_moe.run_batches/1", "fingerprints": [], "results": {}, "x": _Payload(marker)}, path)
    lm = language_model(tiny_model("olmoe"))
    with pytest.raises(ResultsFileError, match=f"{path}.*cannot be read as safetensors"):
        _run(lm, [_ids()], path)
    assert not marker.exists(), "loading a results file ran code"

    from nnsight_moe.recipes.attribution import attribute

    with pytest.raises(ResultsFileError, match=str(path)):
        attribute(lm, [[5, 6, 7]], [9], levels=("layer",), batch_size=1, remote="local", results_path=path,
                  progress=False)
    assert not marker.exists(), "attribute(results_path=) ran code from the file"


def test_tampered_results_files_are_refused(tmp_path):
    lm = language_model(tiny_model("olmoe"))
    batches = [_ids(seed=0), _ids(seed=1)]
    path = tmp_path / "r.safetensors"
    expected = _run(lm, batches, path)
    assert all(torch.equal(a[i], b[i]) for a, b in zip(_run(lm, batches, path), expected) for i in a)
    good = path.read_bytes()

    # a result value edited in place (same size): the checksum catches it
    raw = bytearray(good)
    raw[-3] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(ResultsFileError, match=f"{path} was modified or corrupted"):
        _run(lm, batches, path)
    # truncated
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(ResultsFileError, match=f"{path} is not a .* results file"):
        _run(lm, batches, path)
    # a foreign safetensors file
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(path))
    with pytest.raises(ResultsFileError, match="safetensors file but not a"):
        _run(lm, batches, path)
    # the JSON header rewritten to claim other content (checksum not recomputed)
    from safetensors import safe_open
    from safetensors.torch import save

    path.write_bytes(good)
    with safe_open(str(path), "pt") as handle:
        meta, tensors = handle.metadata(), {k: handle.get_tensor(k) for k in handle.keys()}
    body = json.loads(meta["nnsight_moe"])
    body["results"]["d"][0][0] = {"i": "7"}
    path.write_bytes(save(tensors, metadata={**meta, "nnsight_moe": json.dumps(body)}))
    with pytest.raises(ResultsFileError, match="modified or corrupted"):
        _run(lm, batches, path)


def test_results_file_round_trips_every_plain_type(tmp_path):
    value = {0: (torch.arange(3), [1.5, float("nan"), None, True, "s"]), "k": {(1, 2): torch.zeros(0, 2, dtype=torch.bfloat16)},
             2: torch.tensor([True, False]), 3: 2**70}
    path = tmp_path / "x.safetensors"
    files.save_results(path, "test/1", {"a": 1}, value)
    header, back = files.load_results(path, "test/1")
    assert header == {"a": 1}
    assert set(back) == {0, "k", 2, 3} and back[3] == 2**70
    assert torch.equal(back[0][0], value[0][0]) and isinstance(back[0], tuple)
    assert back[0][1][0] == 1.5 and back[0][1][1] != back[0][1][1] and back[0][1][2:] == [None, True, "s"]
    assert back["k"][(1, 2)].dtype == torch.bfloat16 and back["k"][(1, 2)].shape == (0, 2)
    with pytest.raises(ResultsFileError, match="is not a other/1 results file"):
        files.load_results(path, "other/1")
    with pytest.raises(TypeError, match="cannot store a object"):
        files.save_results(path, "test/1", {}, object())


# ------------------------------------------------------------------ 3. resume refused for other work
def test_resume_refused_for_another_model_dtype_or_function(tmp_path):
    batches = [_ids(seed=0), _ids(seed=1)]
    path = tmp_path / "r.safetensors"
    lm = language_model(tiny_model("olmoe", seed=0))
    first = _run(lm, batches, path)
    again = _run(lm, batches, path)  # same everything: resumes (nothing recomputed, same numbers)
    assert all(torch.equal(a[i], b[i]) for a, b in zip(first, again) for i in a)

    other = language_model(tiny_model("olmoe", seed=1))  # same architecture and config, other weights
    with pytest.raises(ResultsFileError, match="model weights differ"):
        _run(other, batches, path)
    bf16 = language_model(tiny_model("olmoe", seed=0, dtype=torch.bfloat16))
    with pytest.raises(ResultsFileError, match=r"dtype \(torch.float32 in the file, torch.bfloat16 now\)"):
        _run(bf16, batches, path)
    bigger = language_model(tiny_model("olmoe", seed=0, num_experts_per_tok=3))
    with pytest.raises(ResultsFileError, match="model config"):
        _run(bigger, batches, path)
    mixtral = language_model(tiny_model("mixtral", seed=0))
    with pytest.raises(ResultsFileError, match="model class"):
        _run(mixtral, batches, path)
    with pytest.raises(ResultsFileError, match=r"function \(.*_scores in the file, .*_weights now\)"):
        _run(lm, batches, path, fn=_weights)  # another function, no key=
    with pytest.raises(ResultsFileError, match="settings differ"):
        _run(lm, batches, path, key={"k": 2})


def test_model_identity_of_a_meta_model_uses_name_and_revision():
    hf = tiny_model("olmoe")
    ident = files.model_identity(hf)
    assert ident["weights"] is not None and ident["dtype"] == "torch.float32"
    with torch.device("meta"):
        meta = type(hf)(hf.config)
    meta.config._name_or_path, meta.config._commit_hash = "org/model", "abc"
    m = files.model_identity(meta)
    assert m["weights"] is None and m["name"] == "org/model" and m["revision"] == "abc"
    assert files.identity_changes(m, {**m, "revision": "def"}) == ["model revision"]
    assert files.identity_changes(m, {**m, "name": "org/other"})


# ------------------------------------------------------------------ 8. atomic writes, unique temp names
def test_concurrent_results_writers_do_not_tear_each_other(tmp_path, monkeypatch):
    """Writer 1 pauses just before its rename while writer 2 writes the same file completely."""
    path = tmp_path / "r.safetensors"
    from nnsight_moe import remote

    real_replace, paused = os.replace, []

    def replace(src, dst):
        if not paused:
            paused.append(src)
            remote._save_results(path, ["b"], {0: torch.ones(50)})  # writer 2, all the way through
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    remote._save_results(path, ["a"], {0: torch.zeros(50)})  # writer 1
    header, results = files.load_results(path, FORMAT)
    assert header["fingerprints"] == ["a"] and torch.equal(results[0], torch.zeros(50)), "last complete write wins"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.safetensors"], "no temporary file left behind"


_FSIZE_SCRIPT = """
import json, resource, signal, sys, time
from pathlib import Path
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
from nnsight_moe.report import Section, write
out = Path(sys.argv[1])
header = {"model": {k: 0 for k in ("name", "family", "model_type", "n_layers", "moe_layers", "n_experts", "top_k",
          "has_shared")}, "data": {"source": "x", "n_facts": 0, "relations": [], "skipped": []}}
write(out, header, [Section("small", "small")], time.time())
before = (out / "results.json").read_text()
resource.setrlimit(resource.RLIMIT_FSIZE, (4000, 4000))  # a "full disk" for anything past 4000 bytes
try:
    write(out, header, [Section("big", "big", data={"x": list(range(5000))})], time.time())
except OSError as error:
    print("ERROR", error)
print("KEPT" if (out / "results.json").read_text() == before else "LOST")
"""


def test_report_write_failure_keeps_the_previous_run(tmp_path):
    run = subprocess.run([sys.executable, "-c", _FSIZE_SCRIPT, str(tmp_path)], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "MPLBACKEND": "Agg"})
    assert run.returncode == 0, run.stderr
    assert "KEPT" in run.stdout, run.stdout
    assert f"could not write '{tmp_path / 'results.json'}'" in run.stdout
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


# ------------------------------------------------------------------ 9. disk full while saving results
def test_run_batches_survives_a_full_disk(tmp_path, monkeypatch):
    from nnsight_moe import remote

    lm = language_model(tiny_model("olmoe"))
    batches = [_ids(seed=s) for s in range(3)]
    path = tmp_path / "r.safetensors"
    expected = _run(lm, batches, None)
    real, calls = remote.save_results, []

    def save(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(remote, "save_results", save)
    with pytest.warns(RuntimeWarning, match="No space left on device.*batch 2/3 is kept in memory"):
        got = _run(lm, batches, path)
    assert all(torch.equal(a[i], b[i]) for a, b in zip(got, expected) for i in a), "no batch lost"
    _, saved = files.load_results(path, FORMAT)
    assert sorted(saved) == [0, 1, 2], "the next write caught up"


# ------------------------------------------------------------------ 2. non-finite logits are not perfect scores
def _nan_model():
    """A tiny OLMoE whose layer-1 attention output projection is NaN (a broken checkpoint)."""
    hf = tiny_model("olmoe")
    with torch.no_grad():
        hf.model.layers[1].self_attn.o_proj.weight[0, 0] = float("nan")
    return hf


PROMPTS = [[5, 9, 17, 33], [7, 8, 9], [11, 12, 13, 14, 15]]
TARGETS = [3, 40, 77]


def test_target_ranks_refuse_or_rank_worst_non_finite_logits():
    from nnsight_moe.recipes.metrics import NonFiniteError, checked_ranks, hit_at_k, mrr, target_ranks

    logits = torch.randn(3, 10)
    logits[1] = float("nan")
    logits[2, 4] = float("inf")
    with pytest.raises(NonFiniteError, match=r"for 2 of 3 prompts \(first: prompt 11.*nonfinite='worst'") as info:
        target_ranks(logits, [0, 1, 2], prompts=[10, 11, 12])
    assert info.value.prompts == [11, 12]
    with pytest.raises(NonFiniteError):
        mrr(logits, [0, 1, 2])
    with pytest.raises(NonFiniteError):
        hit_at_k(logits, [0, 1, 2])
    worst = target_ranks(logits, [0, 1, 2], nonfinite="worst")
    assert worst[1:].tolist() == [10, 10] and worst[0] == target_ranks(logits[:1], [0])[0]
    assert mrr(logits, [0, 1, 2], nonfinite="worst") < 1.0
    with pytest.raises(ValueError, match="nonfinite must be one of"):
        target_ranks(logits, [0, 1, 2], nonfinite="ignore")
    with pytest.raises(NonFiniteError, match="first: prompt 1"):
        checked_ranks(torch.tensor([[1, 0, 2], [1, 1, 0]]), 10)
    assert checked_ranks(torch.tensor([1, 0]), 10, nonfinite="worst").tolist() == [1, 10]
    from nnsight_moe.recipes.metrics import mrr_of_ranks

    with pytest.raises(ValueError, match="1-based"):
        mrr_of_ranks(torch.tensor([1, 0]))


def test_nan_checkpoint_blocking_raises_naming_prompt_and_module():
    from nnsight_moe.recipes import blocking
    from nnsight_moe.recipes.metrics import NonFiniteError, first_nonfinite

    hf = _nan_model()
    assert first_nonfinite(hf, input_ids=torch.tensor([PROMPTS[0]])) == "model.layers.1.self_attn.o_proj"
    for stacked in (True, False):
        with pytest.raises(NonFiniteError, match="prompt 0.*model.layers.1.self_attn.o_proj" if not stacked
                           else "prompt 0"):
            blocking.evaluate(hf, (PROMPTS, torch.tensor(TARGETS)), [[]], stacked=stacked, progress=False)
    with pytest.raises(NonFiniteError, match="computed remotely"):
        blocking.evaluate(language_model(hf), (PROMPTS, torch.tensor(TARGETS)), [[]], remote="local", progress=False)


@pytest.mark.parametrize("remote", [None, "local"])
def test_nan_checkpoint_attribution_raises_naming_layer(remote):
    from nnsight_moe.recipes.attribution import attribute
    from nnsight_moe.recipes.metrics import NonFiniteError

    hf = _nan_model()
    model = hf if remote is None else language_model(hf)
    where = "model.layers.1.self_attn.o_proj" if remote is None else ""
    # locally the per-batch ranks see the NaN logits first; remotely the scores are checked first
    message = rf"logits are NaN.*first: prompt 0.*{where}" if remote is None else r"attribution scores are NaN.*first: prompt 0"
    with pytest.raises(NonFiniteError, match=message):
        attribute(model, PROMPTS, TARGETS, levels=("layer",), batch_size=2, remote=remote, progress=False)


def test_nan_checkpoint_job_baseline_raises(tmp_path):
    from nnsight_moe import data as relation_data
    from nnsight_moe.job import Job, baseline_section
    from nnsight_moe.recipes.metrics import NonFiniteError

    from helpers import word_tokenizer

    hf = _nan_model()
    tok = word_tokenizer("left")
    relation = relation_data.Relation("r", ["{} w5"], [("w7", "w9"), ("w8 w11", "w12")])
    encoded = relation_data.encode_facts(tok, relation.facts())
    for model, remote in ((hf, None), (language_model(hf), "local")):
        job = Job("nan", model, tok, [relation], encoded, remote=remote, batch_size=2)
        with pytest.raises(NonFiniteError, match="prompt 0"):
            baseline_section(job)


# ------------------------------------------------------------------ 6. recipes remove exactly their own hooks
def _recipes():
    from nnsight_moe.recipes import attribution, blocking, head_expert

    data = (PROMPTS * 2, torch.tensor(TARGETS * 2), ["a"] * 3 + ["b"] * 3)
    pairs = (PROMPTS * 2, TARGETS * 2)
    return {
        "attribute": lambda m: attribution.attribute(m, PROMPTS, TARGETS, levels=("layer", "expert"), progress=False),
        "rank_experts": lambda m: blocking.rank_experts(m, data, by="gate", progress=False),
        "sweep": lambda m: blocking.sweep(m, data, by="gate", top_n=(1,), seeds=1, progress=False),
        "correlate": lambda m: head_expert.correlate(m, pairs, signal="router_prob", top_k=2, permutations=5),
        "causal": lambda m: head_expert.causal(m, pairs, k_heads=1, seeds=1, progress=False,
                                               correlation=head_expert.correlate(m, pairs, signal="router_prob",
                                                                                 top_k=2, permutations=5)),
    }


@pytest.mark.parametrize("recipe", ["attribute", "rank_experts", "sweep", "correlate", "causal", "job"])
def test_recipes_keep_the_users_hooks(recipe):
    hf = tiny_model("olmoe")
    handle = nnsight_moe.attach(hf)
    seen: list = []
    names = [(i, name) for i in handle.layout.moe_layers for name in handle.layout.layer(i).hook_names]
    for i, name in names:
        handle.block(i)._modules[name].add_hook(lambda v, hook: seen.append(hook.name))
    if recipe == "job":
        from nnsight_moe import data as relation_data
        from nnsight_moe.job import Job, routing_load

        from helpers import word_tokenizer

        tok = word_tokenizer("left")
        relation = relation_data.Relation("r", ["{} w5"], [("w7", "w9"), ("w8 w11", "w12")])
        routing_load(Job("j", hf, tok, [relation], relation_data.encode_facts(tok, relation.facts())))
    else:
        _recipes()[recipe](hf)
    seen.clear()
    with torch.no_grad():
        hf(torch.tensor([PROMPTS[0]]))
    assert sorted(seen) == sorted(handle.block(i)._modules[n].name for i, n in names), "the user's hooks survived"
    assert all(len(handle.block(i)._modules[n].fwd_hooks) == 1 for i, n in names), "the recipe's own hooks are gone"


# ------------------------------------------------------------------ 5. no API key over plain http
def test_plain_http_remote_is_refused_except_loopback(monkeypatch):
    import nnsight

    from nnsight_moe.remote import _check_remote

    monkeypatch.delenv("NNSIGHT_MOE_ALLOW_HTTP", raising=False)
    lm = language_model(tiny_model("olmoe"))
    for url in ("http://ndif.example.org", "http://10.0.0.5:8080"):
        with pytest.raises(ValueError, match="refusing plain http"):
            _run(lm, [_ids()], None, remote=url)
    for url in ("https://", "http://user:secret@localhost:1"):
        with pytest.raises(ValueError, match="names no host|credentials"):
            _check_remote(url)
    for url in ("http://localhost:5001", "http://127.0.0.1:5001", "http://[::1]:5001", "https://ndif.example.org"):
        _check_remote(url)  # loopback or encrypted: accepted
    monkeypatch.setattr(nnsight.CONFIG.API, "HOST", "http://ndif.example.org")
    with pytest.raises(ValueError, match="configured NDIF host.*refusing plain http"):
        _check_remote(True)
    monkeypatch.setenv("NNSIGHT_MOE_ALLOW_HTTP", "1")
    _check_remote("http://ndif.example.org")  # explicit opt-in


def test_cli_refuses_plain_http_before_loading(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from nnsight_moe.cli import main

    monkeypatch.delenv("NNSIGHT_MOE_ALLOW_HTTP", raising=False)
    result = CliRunner().invoke(main, ["run", "--remote", "http://ndif.example.org", "--out", str(tmp_path / "o"),
                                       "--model", "Org/Model"])
    assert result.exit_code == 1 and "refusing plain http" in result.output, result.output


# ------------------------------------------------------------------ 4. the main job resumes after an interrupt
def _job(out, data, *extra):
    return [sys.executable, "-m", "nnsight_moe.cli", "run", "--data", str(data), "--out", str(out), "--quick",
            "--batch-size", "4", *extra]


def _comparable(out):
    results = json.loads((out / "results.json").read_text())
    del results["created"], results["runtime_s"]
    return results


#: ``nnsight-moe`` whose blocking section signals that it has started (argv[1]: a file) and then waits
#: until Ctrl-C: the interrupt lands inside the section however loaded the machine is. Python's own
#: Ctrl-C handler is installed first, as in a terminal: a suite started in the background by a
#: non-interactive shell hands its children SIGINT ignored, and Python then installs none.
_BLOCKING_WAITS_FOR_CTRL_C = """
import pathlib, signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)
from nnsight_moe import cli
from nnsight_moe.recipes import blocking
started = pathlib.Path(sys.argv[1])
def section(*args, **kwargs):
    started.write_text("blocking started")
    while True:
        time.sleep(0.05)
blocking.section = section
sys.argv = ["nnsight-moe", *sys.argv[2:]]
cli.main()
"""


def test_cli_interrupted_with_sigint_resumes_and_matches_a_full_run(tmp_path):
    """Ctrl-C while the blocking section runs; the rerun resumes baseline and attribution only.

    The interrupted run's blocking section (the job looks it up when it runs, so a patched one is used)
    writes a file and waits for the signal, which is sent once the file exists. Earlier forms of this test
    raced the job: a signal sent on the checkpoint file came ~2 ms before "section attribution" was
    printed, and one sent on the blocking start line, read by a loaded test process, could come after a
    1-second blocking section had finished.
    """
    import signal

    from nnsight_moe import data as relation_data

    good = json.loads((relation_data.bundled_dir() / "country_capital_city.json").read_text())
    good["samples"] = good["samples"][:6]
    data = tmp_path / "small.json"
    data.write_text(json.dumps(good))
    env = {**os.environ, "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1"}
    reference = tmp_path / "reference"
    run = subprocess.run(_job(reference, data), capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-3000:]

    out = tmp_path / "out"
    kept = out / ".nnsight-moe-resume" / "section-attribution.json"
    started, log = tmp_path / "blocking-started", tmp_path / "interrupted.log"
    command = [sys.executable, "-c", _BLOCKING_WAITS_FOR_CTRL_C, str(started), *_job(out, data)[3:]]
    with open(log, "w") as sink:
        proc = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, text=True, env=env)
        try:
            deadline = time.monotonic() + 600
            while not started.exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            kept_when_interrupted = kept.exists()
            running = proc.poll() is None
            proc.send_signal(signal.SIGINT)  # Ctrl-C during the blocking section
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    first = log.read_text()
    assert started.exists() and running, f"the blocking section did not start: {first[-3000:]}"
    assert kept_when_interrupted, f"the blocking section started before the attribution checkpoint: {first[-3000:]}"
    assert proc.returncode != 0 and not (out / "results.json").exists(), first[-3000:]
    assert "section baseline" in first and "section attribution" in first and "section blocking" not in first

    other = subprocess.run(_job(out, data, "--batch-size", "3"), capture_output=True, text=True, timeout=600, env=env)
    assert other.returncode == 1 and "holds the unfinished work of another run (settings differ)" in other.stderr

    rerun = subprocess.run(_job(out, data), capture_output=True, text=True, timeout=600, env=env)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "section baseline: resumed" in rerun.stdout and "section attribution: resumed" in rerun.stdout
    assert "section blocking: resumed" not in rerun.stdout and "section head_expert: resumed" not in rerun.stdout
    assert _comparable(out) == _comparable(reference), "the resumed run gives the results of an uninterrupted one"
    assert not (out / ".nnsight-moe-resume").exists(), "a finished run leaves nothing to resume"


def test_job_stage_and_fresh(tmp_path, monkeypatch):
    """Stages are kept and reused; --fresh discards kept work; a corrupt checkpoint is named."""
    from nnsight_moe.job import Job, _open_checkpoint

    job = Job.__new__(Job)
    job.remote, job.checkpoint = None, _open_checkpoint(tmp_path, {"function": "f", "settings": "s"}, fresh=False)
    calls = []
    assert job.stage("x", lambda: calls.append(1) or {"a": [1, 2]}) == {"a": [1, 2]}
    assert job.stage("x", lambda: calls.append(1) or {"a": [9]}) == {"a": [1, 2]} and calls == [1]
    with pytest.raises(ValueError, match=r"another run \(settings differ\).*--fresh"):
        _open_checkpoint(tmp_path, {"function": "f", "settings": "t"}, fresh=False)
    job.checkpoint = _open_checkpoint(tmp_path, {"function": "f", "settings": "t"}, fresh=True)
    assert job.stage("x", lambda: {"a": [3]}) == {"a": [3]}
    (job.checkpoint / "stage-y.json").write_text("{" * 100000)
    with pytest.raises(ValueError, match="stage-y.json is not a readable nnsight-moe checkpoint"):
        job.stage("y", lambda: 1)


# ------------------------------------------------------------------ 9. clear errors instead of tracebacks
def test_device_without_a_gpu_is_a_clear_error(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from nnsight_moe.cli import main
    from nnsight_moe.models import check_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="device 'cuda': no CUDA GPU is available"):
        check_device("cuda")
    with pytest.raises(ValueError, match="is not a torch device"):
        check_device("gpu0")
    assert check_device("cpu") == torch.device("cpu") and check_device(None) is None
    result = CliRunner().invoke(main, ["run", "--device", "cuda", "--out", str(tmp_path / "o"), "--quick"])
    assert result.exit_code == 1 and "Error: device 'cuda': no CUDA GPU is available" in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_relation_files_nested_too_deeply_or_with_lone_surrogates(tmp_path):
    from click.testing import CliRunner

    from nnsight_moe.cli import main
    from nnsight_moe.data import RelationFormatError, load_relation

    nested = tmp_path / "nested.json"
    nested.write_text("[" * 200000 + "]" * 200000)
    with pytest.raises(RelationFormatError, match="'nested.json' is not LRE relation JSON: nested too deeply"):
        load_relation(nested)
    lone = tmp_path / "lone.json"
    lone.write_text('{"name": "r", "prompt_templates": ["{} is in"], "samples": [{"subject": "a", "object": "b"}, '
                    '{"subject": "x\\ud800y", "object": "c"}]}')
    with pytest.raises(RelationFormatError, match=r"'lone.json' .*samples\[1\] subject holds a lone UTF-16 surrogate"):
        load_relation(lone)
    doubly = tmp_path / "doubly.json"  # a doubly escaped surrogate PAIR is one character, not an error
    doubly.write_text('{"name": "r", "prompt_templates": ["{} is in"], "samples": [{"subject": "a\\\\ud83c\\\\udf0d", '
                      '"object": "b"}]}')
    assert load_relation(doubly).samples[0][0] == "a\U0001f30d"
    for path in (nested, lone):
        result = CliRunner().invoke(main, ["run", "--data", str(path), "--out", str(tmp_path / "o")])
        assert result.exit_code == 1 and path.name in result.output and "Traceback" not in result.output


# ------------------------------------------------------------------ 10. concurrent forwards are refused
def test_concurrent_forwards_on_an_attached_model_are_refused():
    from nnsight_moe.hooks import ConcurrentForwardError

    hf = tiny_model("olmoe")
    ids_a, ids_b = _ids(2, 6, 0), _ids(3, 4, 1)
    with torch.no_grad():
        want_a, want_b = hf(ids_a).logits, hf(ids_b).logits
    handle = nnsight_moe.attach(hf)
    first = handle.layout.moe_layers[0]
    inside, release, out, errors = threading.Event(), threading.Event(), {}, []

    def pause(value, hook):
        if threading.current_thread().name == "A":
            inside.set()
            assert release.wait(60)

    handle.block(first).hook_router_logits.add_hook(pause)

    def run_a():
        with torch.no_grad():
            out["a"] = hf(ids_a).logits

    a = threading.Thread(target=run_a, name="A")
    a.start()
    assert inside.wait(60)
    try:
        with torch.no_grad(), pytest.raises(ConcurrentForwardError, match=f"layer {first}: .*another thread"):
            hf(ids_b)  # thread A is inside layer `first`: refused, not mixed
    finally:
        release.set()
        a.join(60)
    torch.testing.assert_close(out["a"], want_a, atol=1e-5, rtol=0)  # A was not disturbed

    def failing(value, hook):
        raise KeyError("user hook fails")

    point = handle.block(first).hook_router_scores
    point.add_hook(failing)
    with pytest.raises(KeyError):
        hf(ids_a)
    point.remove_hooks()
    handle.block(first).hook_router_logits.remove_hooks()
    worker = threading.Thread(target=lambda: out.__setitem__("b", hf(ids_b).logits.detach()))
    worker.start()
    worker.join(60)  # after A finished and after a failed forward, another thread runs normally
    torch.testing.assert_close(out["b"], want_b, atol=1e-5, rtol=0)


# ------------------------------------------------------------------ 7. bad inputs named, not mishandled
def test_relation_named_all_is_refused():
    from nnsight_moe.recipes import blocking

    with pytest.raises(ValueError, match="a relation is named 'all'"):
        blocking.evaluate(tiny_model("olmoe"), (PROMPTS, TARGETS, ["all", "b", "b"]), [[]], progress=False)


def test_job_refuses_a_relation_named_all(tmp_path):
    from nnsight_moe.job import run_job

    bad = tmp_path / "all.json"
    bad.write_text(json.dumps({"name": "all", "prompt_templates": ["{} is in"],
                               "samples": [{"subject": "Paris", "object": "France"}]}))
    with pytest.raises(ValueError, match="is named 'all'"):
        run_job("demo-moe", str(bad), tmp_path / "o", quick=True)


def test_empty_prompts_are_refused():
    from nnsight_moe.recipes import blocking
    from nnsight_moe.recipes.attribution import attribute

    from helpers import word_tokenizer

    hf = tiny_model("olmoe")
    with pytest.raises(ValueError, match=r"prompts \[1\] of this batch are empty"):
        attribute(hf, [[5, 6], []], [3, 4], levels=("layer",), progress=False)
    with pytest.raises(ValueError, match=r"prompts \[0\] of this batch are empty"):
        attribute(hf, ["", "w5 w6"], [3, 4], tokenizer=word_tokenizer("left"), levels=("layer",), progress=False)
    with pytest.raises(ValueError, match="no tokens"):  # blocking already refused them
        blocking.evaluate(hf, ([[5, 6], [], [7]], [3, 4, 5]), [[]], progress=False)


def test_float_targets_and_integer_like_layer_keys():
    import numpy as np

    from nnsight_moe.recipes import blocking
    from nnsight_moe.recipes.metrics import target_ranks

    hf = tiny_model("olmoe")
    with pytest.raises(TypeError, match="target ids must be integer token ids, got torch.float32"):
        target_ranks(torch.randn(2, 10), torch.tensor([1.7, 2.2]))
    with pytest.raises(TypeError, match="target ids must be integer token ids"):
        blocking.evaluate(hf, (PROMPTS, [3.7, 40.2, 77.9]), [[]], progress=False)
    layer = nnsight_moe.layout(hf).moe_layers[0]
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        with nnsight_moe.block_experts(hf, {layer: [0, 1]}):
            want = hf(ids).logits
        for key, experts in ((np.int64(layer), [np.int64(0), np.int64(1)]), (torch.tensor(layer), torch.tensor([0, 1]))):
            with nnsight_moe.block_experts(hf, {key: experts}):
                torch.testing.assert_close(hf(ids).logits, want, atol=0, rtol=0)
    with pytest.raises(IndexError, match="layer 1.5 is out of range"):
        nnsight_moe.layout(hf).layer(1.5)


def test_nested_reroute_respects_the_cap():
    hf = tiny_model("olmoe")  # 8 experts, top-2: at most 6 can be rerouted around
    layer = nnsight_moe.layout(hf).moe_layers[0]
    with nnsight_moe.block_experts(hf, {layer: [0, 1, 2, 3]}, mode="reroute"):
        with nnsight_moe.block_experts(hf, {layer: [4, 5]}, mode="reroute"):
            pass  # 6 together: allowed
        with pytest.raises(ValueError, match="cannot reroute around 7 of 8 experts .* enclosing ones together"):
            with nnsight_moe.block_experts(hf, {layer: [4, 5, 6]}, mode="reroute"):
                pass


def test_router_edit_of_the_wrong_width_is_refused():
    hf = tiny_model("olmoe")
    handle = nnsight_moe.attach(hf)
    layer = handle.layout.moe_layers[0]
    point = handle.block(layer).hook_router_scores
    point.add_hook(lambda scores, hook: scores[..., :-1])  # one expert short
    with torch.no_grad(), pytest.raises(ValueError, match=rf"layer {layer}: hook_router_scores must be a tensor of shape"):
        hf(torch.tensor([PROMPTS[0]]))
    point.remove_hooks()
    handle.block(layer).hook_topk_indices.add_hook(lambda idx, hook: idx + 100)
    with torch.no_grad(), pytest.raises(ValueError, match="hook_topk_indices must hold integer expert ids in 0..7"):
        hf(torch.tensor([PROMPTS[0]]))
    handle.block(layer).hook_topk_indices.remove_hooks()
    handle.block(layer).hook_topk_indices.add_hook(lambda idx, hook: idx.add_(100))  # in place: checked too
    with torch.no_grad(), pytest.raises(ValueError, match="hook_topk_indices must hold integer expert ids in 0..7"):
        hf(torch.tensor([PROMPTS[0]]))


def test_switching_the_experts_implementation_while_attached_is_detected():
    hf = tiny_model("olmoe")
    nnsight_moe.attach(hf)
    hf.set_experts_implementation("eager")
    with torch.no_grad(), pytest.raises(RuntimeError, match="ran without the 'nnsight_moe' experts implementation"):
        hf(torch.tensor([PROMPTS[0]]))
    hf.set_experts_implementation("nnsight_moe")
    with torch.no_grad():
        hf(torch.tensor([PROMPTS[0]]))


def test_resumed_stages_round_trip_exactly():
    """What Job.stage keeps for the sweep's ranking and the causal checks' correlation reads back equal."""
    from nnsight_moe.recipes import blocking, head_expert

    hf = tiny_model("olmoe")
    data = (PROMPTS * 2, TARGETS * 2, ["a"] * 3 + ["b"] * 3)
    ranking = blocking.rank_experts(hf, data, by="gate", progress=False)
    back = blocking.Ranking.from_json(json.loads(json.dumps(ranking.to_json())))
    assert back == ranking
    corr = head_expert.correlate(hf, (PROMPTS * 2, TARGETS * 2), signal="router_prob", top_k=2, permutations=5)
    again = head_expert.HeadExpertResult.from_dict(json.loads(json.dumps(corr.to_dict())))
    assert again.to_json() == corr.to_json() and again.top_heads == corr.top_heads
    assert again.pairs.equals(corr.pairs)
    options = dict(k_heads=1, seeds=1, progress=False)
    pairs = (PROMPTS * 2, TARGETS * 2)
    assert head_expert.causal(hf, pairs, correlation=again, **options).to_frame().equals(
        head_expert.causal(hf, pairs, correlation=corr, **options).to_frame())
