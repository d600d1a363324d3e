"""The main job behind ``nnsight-moe run``: open a model and relations, run every recipe, write a report.

Sections, each skipped with a note when it does not apply (e.g. a dense model has no experts):

* ``baseline``: MRR / HIT@10 of the target per relation, and the expert load per MoE layer;
* the recipes in :data:`RECIPE_SECTIONS` (attribution, blocking, head-expert correlation, recovery on
  the planted model);
* ``claims``: which of the study's qualitative claims this run reproduces (:mod:`nnsight_moe.recipes.claims`).

Resume: the job keeps its finished work under ``<out>/.nnsight-moe-resume/``: each finished section,
the stages a section marks with :meth:`Job.stage` (the expert ranking of the blocking sweep, the
correlation of the causal checks) and, with ``remote``, every finished remote batch
(:meth:`Job.results_path`). A rerun into the same ``--out`` after an interrupt (Ctrl-C, a lost
connection) recomputes only what is missing, and refuses (naming what differs) to resume a run of
another model, dtype, data or settings; ``fresh=True`` (``--fresh``) discards the kept work first. The
folder is removed once results.json and report.html are written.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from nnsight_moe.progress import label
from nnsight_moe.report import Section, write

__all__ = ["RECIPE_SECTIONS", "RESUME_DIR", "TARGETS", "Job", "check_out_dir", "run_job"]


#: Which token the recipes score: the gold object's first token, or the model's own top-1 prediction.
TARGETS = ("gold", "prediction")

#: Folder under ``--out`` holding the finished work of an unfinished run.
RESUME_DIR = ".nnsight-moe-resume"


class Job:
    """What every section gets: the model, tokenizer, encoded facts and options.

    ``gold`` holds every usable fact with its gold target (the baseline scores these). ``encoded`` is
    what the recipes run on: with ``target="prediction"`` the targets are the model's own top-1
    predictions at the last position (the study's lineage code), with ``only_correct`` only the facts
    whose gold target is the model's top-1 are kept (:meth:`predictions` gives both, computed once).

    With ``remote`` set, ``model`` is an nnsight ``LanguageModel`` (its weights may be on the meta
    device, with NDIF) and every section runs through ``model.trace(..., remote=remote)``.
    """

    def __init__(self, name, model, tokenizer, relations, encoded, *, remote=None, batch_size=16, quick=False,
                 max_per_relation: int | None = 24, target: str = "gold", only_correct: bool = False,
                 split: bool = True, dense: str | None = None):
        import nnsight_moe

        if target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
        self.name, self.model, self.tokenizer = name, model, tokenizer
        self.relations, self.gold = relations, encoded
        self.remote, self.batch_size, self.quick = remote, batch_size, quick
        self.target, self.only_correct = target, bool(only_correct)
        #: blocking ranks experts on one half of each relation's subjects and evaluates on the other
        self.split = bool(split)
        #: dense models compared with this one in the attribution section, a list (possibly empty); by
        #: default :data:`nnsight_moe.demo.DEFAULT_DENSE` (demo-moe: demo-dense; faithful-moe: both faithful
        #: dense models), else none
        from nnsight_moe.models import dense_models

        self.dense = dense_models(name, dense)
        #: prompts per relation the recipes use (None: all); the baseline always uses every fact
        self.max_per_relation = 8 if quick else max_per_relation
        self._predictions = None
        self._selected = None
        self._remote_load = None
        try:
            self.layout = nnsight_moe.layout(model)
        except nnsight_moe.UnsupportedModelError:
            self.layout = None  # dense model: only the sections that need no experts run
        #: resume folder (None: nothing is kept); set by :func:`run_job`
        self.checkpoint: Path | None = None

    def results_path(self, stage: str) -> Path | None:
        """With ``remote`` and a resume folder: the ``run_batches`` results file of ``stage``, else None."""
        if self.remote is None or self.checkpoint is None:
            return None
        return self.checkpoint / f"{stage}.safetensors"

    def stage(self, name: str, compute: Callable[[], Any], save: Callable[[Any], Any] = lambda v: v,
              load: Callable[[Any], Any] = lambda v: v) -> Any:
        """``compute()``, kept in the resume folder as JSON ``save(value)`` and read back as ``load(json)``.

        Without a resume folder this is just ``compute()``.
        """
        if self.checkpoint is None:
            return compute()
        from nnsight_moe.files import atomic_write

        path = self.checkpoint / f"stage-{name}.json"
        if path.exists():
            print(f"stage {name}: resumed from {path}")
            return load(_read_json(path)["value"])
        value = compute()
        atomic_write(path, json.dumps({"value": save(value)}, default=_json_value))
        return value

    @property
    def is_moe(self) -> bool:
        return self.layout is not None

    @property
    def encoded(self):
        """The facts and targets the recipes run on (see the class docstring)."""
        if self._selected is None:
            if self.target == "gold" and not self.only_correct:
                self._selected = self.gold
            else:
                ranks, top1 = self.predictions()
                keep = [i for i in range(len(self.gold)) if not self.only_correct or int(ranks[i]) == 1]
                targets = [int(top1[i]) for i in keep] if self.target == "prediction" else None
                self._selected = self.gold.subset(keep, targets)
                if not self._selected.facts:
                    raise ValueError("--only-correct: the model answers no fact correctly (no gold target is its "
                                     "top-1 prediction); nothing for the recipes to run on")
        return self._selected

    def by_relation(self, encoded=None) -> dict[str, list[int]]:
        """Fact indices (into ``encoded``, default the recipes' facts) per relation name."""
        groups: dict[str, list[int]] = {}
        for i, fact in enumerate((self.encoded if encoded is None else encoded).facts):
            groups.setdefault(fact.relation, []).append(i)
        return groups

    def sample(self):
        """The encoded facts the recipes run on: at most ``max_per_relation`` per relation, evenly spread."""
        from nnsight_moe.data import evenly_spaced

        if self.max_per_relation is None:
            return self.encoded
        keep = sorted(i for indices in self.by_relation().values() for i in evenly_spaced(indices, self.max_per_relation))
        return self.encoded.subset(keep)

    def predictions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(rank of the gold target [P], the model's top-1 token [P]) for every fact of ``gold``, computed
        once per job (batched; only [batch, V] logits at a time), remotely under ``remote``."""
        if self._predictions is None:
            if self.remote is not None:
                ranks, top1, self._remote_load = _baseline_remote(self)
            else:
                ranks, top1 = self._predict_local()
            self._predictions = (ranks, top1)
        return self._predictions

    @torch.no_grad()
    def _predict_local(self) -> tuple[torch.Tensor, torch.Tensor]:
        from nnsight_moe.recipes import runner

        prompts = self.gold.prompts
        results = runner.run(self.model, prompts, _ranks_local, tokenizer=self.tokenizer, batch_size=self.batch_size,
                             per_prompt={"target": torch.tensor(self.gold.targets)},
                             desc=f"target ranks of {len(prompts)} facts")
        return torch.cat([r["rank"] for r in results]), torch.cat([r["top1"] for r in results])

    def selection(self) -> dict:
        """What the recipes score, for results.json: target kind, only-correct, facts used per relation."""
        out = {"target": self.target, "only_correct": self.only_correct, "n_facts": len(self.encoded),
               "per_relation": {name: len(idx) for name, idx in self.by_relation().items()}}
        if self._predictions is not None:
            ranks = self._predictions[0]
            out["n_correct"] = {name: int((ranks[idx] == 1).sum()) for name, idx in self.by_relation(self.gold).items()}
        return out


def baseline_section(job: Job) -> Section:
    """MRR and HIT@10 per relation; expert load (routing frequency) per MoE layer."""
    import matplotlib.pyplot as plt
    import pandas as pd

    from nnsight_moe.recipes.metrics import hits_of_ranks, mrr_of_ranks

    ranks, _ = job.predictions()
    if job.remote is not None:
        load = job._remote_load
    else:
        load = routing_load(job) if job.is_moe else None

    def metrics(r):
        return {"MRR": mrr_of_ranks(r), "HIT@10": hits_of_ranks(r, 10)}

    rows = [{"relation": relation, "facts": len(idx), **metrics(ranks[idx]), "correct": int((ranks[idx] == 1).sum())}
            for relation, idx in job.by_relation(job.gold).items()]
    rows.append({"relation": "all", "facts": len(ranks), **metrics(ranks), "correct": int((ranks == 1).sum())})
    table = pd.DataFrame(rows).set_index("relation")
    chosen = {"gold": "the gold object's first token", "prediction": "the model's own top-1 prediction"}[job.target]
    section = Section("baseline", "Knowledge of the relations (no intervention)",
                      "Rank of the target's first token (in context) among the last-position logits. The recipes "
                      f"score {chosen}" + (" on the facts the model answers correctly" if job.only_correct else "")
                      + f" ({len(job.encoded)} facts)."
                      + (f" Computed through nnsight with remote={job.remote!r}." if job.remote is not None else ""),
                      data={"metrics": table.reset_index().to_dict(orient="records")},
                      tables={"MRR and HIT@10 per relation": table})
    if job.is_moe:
        section.data["expert_load"] = load.tolist()
        fig, ax = plt.subplots(figsize=(min(12, 2 + 0.35 * load.shape[1]), 1 + 0.45 * load.shape[0]))
        image = ax.imshow(load, aspect="auto", cmap="viridis")
        ax.set_xlabel("expert"), ax.set_ylabel("MoE layer")
        ax.set_yticks(range(len(job.layout.moe_layers)), job.layout.moe_layers)
        fig.colorbar(image, ax=ax, label="share of routed slots")
        ax.set_title("Expert load on the relation prompts (non-pad tokens)")
        section.figures["expert_load"] = ("Expert load per MoE layer", fig)
    return section


def _ranks_local(model, batch) -> dict:
    """Target ranks and top-1 tokens of one batch (only the last positions are projected); runner function."""
    from nnsight_moe.recipes import runner
    from nnsight_moe.recipes.metrics import first_nonfinite, target_ranks

    logits = model(**runner.inputs(batch), logits_to_keep=batch["last"][:, None]).logits[:, -1].float()

    def locate(row):  # the first module with a non-finite output, for the error
        return first_nonfinite(model, **{k: v[row : row + 1] for k, v in runner.inputs(batch).items()})

    ranks = target_ranks(logits, batch["target"].to(logits.device), prompts=batch["rows"], locate=locate)
    return {"rank": ranks, "top1": logits.argmax(-1)}


@torch.no_grad()
def routing_load(job: Job) -> torch.Tensor:
    """Share of routed slots per expert, [MoE layers, E], over all non-pad prompt tokens."""
    import nnsight_moe
    from nnsight_moe.hooks import TemporaryHooks
    from nnsight_moe.recipes import runner

    layers, n_experts = job.layout.moe_layers, job.layout.n_experts
    seen: dict[int, torch.Tensor] = {}

    def count(model, batch):
        model(**runner.inputs(batch), logits_to_keep=1)
        keep = batch["attention_mask"].bool()  # padding is routed like any token: masked here
        return torch.stack([torch.bincount(seen[i][keep].reshape(-1).cpu(), minlength=n_experts) for i in layers])

    with nnsight_moe.attached(job.model) as handle, TemporaryHooks() as added:  # removes ours only
        for i in layers:
            added.add(handle.block(i).hook_topk_indices, lambda indices, hook, i=i: seen.__setitem__(i, indices))
        prompts = job.gold.prompts
        counts = sum(runner.run(job.model, prompts, count, tokenizer=job.tokenizer, batch_size=job.batch_size,
                                desc=f"expert load over {len(prompts)} facts")).float()
    return counts / counts.sum(dim=1, keepdim=True).clamp(min=1)


def _baseline_remote(job: Job) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Gold target ranks [P], top-1 tokens [P] and expert load [MoE layers, E] inside ``job.model.trace``."""
    import functools

    from nnsight_moe.recipes import runner
    from nnsight_moe.recipes.metrics import checked_ranks
    from nnsight_moe.remote import MoEView

    prompts = job.gold.prompts
    view = MoEView(job.model) if job.is_moe else None
    results = runner.run(job.model, prompts, functools.partial(_baseline_in_trace, view), tokenizer=job.tokenizer,
                         batch_size=job.batch_size, per_prompt={"target": torch.tensor(job.gold.targets)},
                         remote=job.remote, results_path=job.results_path("baseline"),
                         desc=f"target ranks and expert load of {len(prompts)} facts")
    ranks = checked_ranks(torch.cat([r["rank"] for r in results]), 0)
    top1 = torch.cat([r["top1"] for r in results])
    if view is None:
        return ranks, top1, None
    counts = sum(r["counts"].double() for r in results)
    return ranks, top1, (counts / counts.sum(dim=1, keepdim=True).clamp(min=1)).float()


def _baseline_in_trace(view, model, batch) -> dict:
    """Target ranks and per-layer expert counts over non-pad tokens; runs inside the trace (server side)."""
    out = {}
    if view is not None:
        counts = []
        mask = batch["attention_mask"].bool()
        for layer in view.moe_layers:
            indices = view.layer(layer, want=("topk_indices",))["topk_indices"]
            n_experts = view.spec["layers"][layer]["n_experts"]
            counts.append(torch.bincount(indices[mask].reshape(-1), minlength=n_experts))
        out["counts"] = torch.stack(counts)
    last, target = batch["last"], batch["target"]
    picked = model.output.logits[torch.arange(last.shape[0]), last].float()
    ranks = (picked > picked.gather(1, target[:, None])).sum(-1) + 1
    out["rank"] = torch.where(torch.isfinite(picked).all(-1), ranks, 0)  # 0: non-finite logits (checked_ranks)
    out["top1"] = picked.argmax(-1)
    return out


#: Recipe sections: (name, module, function name). A recipe module that is not installed is skipped.
RECIPE_SECTIONS: list[tuple[str, str, str]] = [
    ("attribution", "nnsight_moe.recipes.attribution", "section"),
    ("blocking", "nnsight_moe.recipes.blocking", "section"),
    ("head_expert", "nnsight_moe.recipes.head_expert", "section"),
    ("steering", "nnsight_moe.recipes.steering", "section"),
    ("routing", "nnsight_moe.recipes.routing_stats", "section"),
    ("fidelity", "nnsight_moe.recipes.fidelity", "section"),
    ("lenses", "nnsight_moe.recipes.lenses", "section"),
    ("super_experts", "nnsight_moe.recipes.super_experts", "section"),
    ("recovery", "nnsight_moe.recipes.recovery", "section"),
]


#: What each section computes, printed when it starts (the job's step lines).
_STEP_TEXT = {
    "baseline": "rank of every fact's target, then the expert load (one routing pass over the same facts)",
    "attribution": "LPI of every layer, head, expert and neuron on the sampled facts",
    "blocking": "rank experts, block the top ones vs random baselines per relation, then shared/routed configurations",
    "head_expert": "head-expert correlation, then suppressing the top heads vs random heads",
    "steering": "experts linked to one relation vs another, forced on / off on held-out prompts vs random experts",
    "routing": "routing statistics, co-activation, transitions, specialisation per relation, generation-time routing",
    "fidelity": "share of tokens whose top-k set changes between dtypes / experts implementations",
    "lenses": "tokens each expert promotes / suppresses through the frozen final readout",
    "super_experts": "max |down_proj input / output| per expert, outliers blocked vs random experts",
    "recovery": "validation on the planted model: do attribution and blocking find its planted experts?",
}


def _step(i: int, n: int, name: str, job: Job, make: Callable[[Job], Section | None]) -> Section | None:
    """Run one section under the label ``[i/n name]``, printing a start and an end line."""
    text = _STEP_TEXT.get(name, "")
    if name == "baseline" and not job.is_moe:
        text = "rank of every fact's target (a dense model has no expert load)"
    print(f"[{i}/{n}] {name}: {text} ...", flush=True)
    started = time.time()
    with label(f"[{i}/{n} {name}]"):
        section = make(job)
    print(f"[{i}/{n}] {name}: done in {time.time() - started:.1f} s", flush=True)
    return section


def _recipe_sections(job: Job, first_step: int = 2) -> list[Section]:
    import importlib

    makers = []
    for name, module, function in RECIPE_SECTIONS:
        try:
            makers.append((name, getattr(importlib.import_module(module), function)))
        except (ImportError, AttributeError):
            continue
    n = first_step - 1 + len(makers)
    sections = []
    for i, (name, make) in enumerate(makers, first_step):
        section = _step(i, n, name, job, lambda j, name=name, make=make: _checkpointed(j, name, lambda: make(j)))
        if section is None:  # the recipe does not apply (e.g. no experts): say so in the report
            reason = ("skipped: the model is dense (no routed experts), so this MoE recipe does not apply"
                      if not job.is_moe else "skipped: the recipe does not apply to this model")
            section = Section(name, f"{name.replace('_', ' ').capitalize()} (skipped)", reason + ".",
                              data={"skipped": reason})
        sections.append(section)
    return sections


def _json_value(value: Any) -> Any:
    """``json.dumps`` default for numpy / torch scalars and arrays."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"cannot store a {type(value).__name__} in a checkpoint")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise ValueError(f"{path} is not a readable nnsight-moe checkpoint ({error}); "
                         "rerun with --fresh to discard the kept work") from None
    if not isinstance(data, dict) or "value" not in data:
        raise ValueError(f"{path} is not an nnsight-moe checkpoint; rerun with --fresh to discard the kept work")
    return data


def _section_to_json(section: Section | None) -> Any:
    """A finished section as JSON: data as is, tables as their report HTML, figures as PNG (base64)."""
    import matplotlib.pyplot as plt

    from nnsight_moe.report import render_table, render_figure

    if section is None:
        return None
    figures = {}
    for name, (title, figure) in section.figures.items():
        figures[name] = [title, base64.b64encode(render_figure(figure)).decode()]
        if not isinstance(figure, bytes):
            plt.close(figure)
    return {"name": section.name, "title": section.title, "text": section.text, "data": section.data,
            "tables": {caption: render_table(frame) for caption, frame in section.tables.items()},
            "figures": figures, "html": section.html}


def _section_from_json(value: Any) -> Section | None:
    if value is None:
        return None
    try:
        return Section(value["name"], value["title"], value["text"], data=value["data"], tables=dict(value["tables"]),
                       figures={n: (t, base64.b64decode(png)) for n, (t, png) in value["figures"].items()},
                       html=dict(value.get("html", {})))
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"a section checkpoint is malformed ({error}); rerun with --fresh") from None


def _checkpointed(job: Job, name: str, make: Callable[[], Section | None]) -> Section | None:
    """Section ``name``, from the resume folder when an earlier run finished it; kept there once made."""
    started = time.time()
    if job.checkpoint is not None and (job.checkpoint / f"section-{name}.json").exists():
        section = _section_from_json(_read_json(job.checkpoint / f"section-{name}.json")["value"])
        print(f"section {name}: resumed from {job.checkpoint}")
        return section
    section = make()
    if job.checkpoint is not None:
        from nnsight_moe.files import atomic_write

        value = _section_to_json(section)  # figures become PNG: the report gets the same bytes either way
        atomic_write(job.checkpoint / f"section-{name}.json", json.dumps({"value": value}, default=_json_value))
        section = _section_from_json(json.loads(json.dumps(value, default=_json_value)))
    print(f"section {name}: {time.time() - started:.1f} s")
    return section


def _open_checkpoint(out: Path, identity: dict, fresh: bool) -> Path:
    """The resume folder under ``out`` for a job with ``identity``; refuses one kept for another job."""
    from nnsight_moe.files import atomic_write, identity_changes

    folder = out / RESUME_DIR
    if fresh and folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(exist_ok=True)
    manifest = folder / "job.json"
    if manifest.exists():
        saved = _read_json(manifest)["value"]
        changes = identity_changes(saved, identity) if isinstance(saved, dict) else ["everything"]
        changes += [f"{key} ({saved.get(key)!r} then, {identity[key]!r} now)" for key in identity
                    if key.startswith("job.") and saved.get(key) != identity[key]]
        if changes:
            raise ValueError(
                f"{out} holds the unfinished work of another run ({'; '.join(changes)} differ): rerun with --fresh "
                "to discard it, or choose another --out")
        print(f"resuming the unfinished run kept in {folder}")
    else:
        atomic_write(manifest, json.dumps({"value": identity}))
    return folder


def check_out_dir(out: str | Path) -> Path:
    """Create ``out`` and prove it is writable, before any compute; clear error otherwise."""
    out = Path(out).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".nnsight-moe-write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise PermissionError(f"--out {str(out)!r} is not a writable directory: {err.strerror or err}") from err
    return out


def _job_batch_size(model, tokenizer, prompts, batch_size, remote, max_memory) -> int:
    """The job's prompts per forward: ``batch_size`` as given, or planned for ``"auto"`` (16 remotely)."""
    from nnsight_moe import memory

    if batch_size != "auto":
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer or 'auto', got {batch_size!r}")
        return batch_size
    if remote is not None:
        return 16  # the server's memory is not known here
    chosen = memory.plan(model, "attribution", len(prompts), memory.max_length(prompts, tokenizer), max_memory,
                         neurons="fast", fast_top=20)
    print(f"memory plan: {chosen}")
    return chosen.batch_size


def run_job(model: str = "demo-moe", data: str | None = None, out: str | Path = "results", *,
            remote: Any = None, device: str | None = None, dtype: str | None = None,
            batch_size: int | str = "auto", quick: bool = False, max_per_relation: int | None = 24,
            target: str = "gold", only_correct: bool = False, fresh: bool = False,
            threads: int | None = None, split: bool = True, dense: str | Sequence[str] | None = None,
            max_memory: Any = None) -> dict:
    """Run the main job and write ``out/results.json`` and ``out/report.html``; returns the results dict.

    ``target``: what the recipes score, ``"gold"`` (the object's first token) or ``"prediction"`` (the
    model's own top-1 at the last position); ``only_correct``: run the recipes on the facts whose gold
    target is the model's top-1 only. Both are recorded in results.json (``data.selection``).
    Finished sections, stages and remote batches are kept under ``out/.nnsight-moe-resume`` so that a
    rerun after an interrupt resumes (module docstring); ``fresh=True`` starts over.
    ``threads``: torch CPU threads (default: ``$NNSIGHT_MOE_THREADS``, else 1 for small models such as the
    demos, else torch's default; see :mod:`nnsight_moe.threads`).
    ``split``: blocking ranks experts on half of each relation's subjects and blocks on the other half
    (False: both on the same facts, in-sample). ``dense``: dense models (a name or path as ``model``, a
    comma-separated string or a list of them; ``"none"``: no comparison) run through the attribution
    recipe on the same prompts for the MoE-vs-dense comparison (default: demo-dense for demo-moe, both
    faithful-dense and faithful-dense-12 for faithful-moe, else none; :func:`dense_models`).
    ``batch_size``: prompts per forward, or ``"auto"``: the largest batch whose estimated peak for the
    heaviest section (attribution with the fast neuron screen) fits ``max_memory`` (bytes or ``"8GiB"``;
    None: the device's free memory minus a margin; :mod:`nnsight_moe.memory`), checked before any compute.
    """
    from nnsight_moe import threads as cpu_threads

    cpu_threads.requested(threads)  # a bad count fails before any compute
    import warnings

    from nnsight_moe import data as relation_data
    from nnsight_moe.models import load_model, load_traced
    from nnsight_moe.recipes.prompts import check_vocab, vocab_size

    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    started = time.time()
    if remote is not None:
        from nnsight_moe.remote import _check_remote

        _check_remote(remote)  # before any loading: a bad or plain-http host fails at once
    out = check_out_dir(out)
    relations = relation_data.load_relations(data) if data else relation_data.bundled()
    if not relations:
        raise ValueError(f"no relations found in {data!r}")
    clash = [r.source or r.name for r in relations if r.name == "all"]
    if clash:
        raise ValueError(f"relation {clash[0]!r} is named 'all', the name of the rows that pool every relation "
                         "in results.json; rename it")
    if remote is None:
        lm, tokenizer = load_model(model, device=device, dtype=dtype)
    else:  # an nnsight LanguageModel: every section runs through model.trace(..., remote=remote)
        lm, tokenizer = load_traced(model, remote, device=device, dtype=dtype)
    print(f"torch CPU threads: {cpu_threads.configure(threads, model=lm)} (set with --threads or "
          f"{cpu_threads.ENV})")
    facts = [fact for relation in relations for fact in relation.facts()]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        encoded = relation_data.encode_facts(tokenizer, facts)
    for warning in caught:
        print(f"warning: {warning.message}")
    if not encoded.facts:
        raise ValueError("no fact has a usable target token for this tokenizer; nothing to run")
    vocab = vocab_size(lm)  # a tokenizer that belongs to another checkpoint: say so before any compute
    check_vocab([i for ids in tokenizer(encoded.prompts)["input_ids"] for i in ids], vocab,
                "the tokenized prompts", tokenizer)
    check_vocab(encoded.targets, vocab, "the target tokens", tokenizer)
    if dense is not None:
        from nnsight_moe.models import check_model_name, dense_models

        for name in dense_models(model, dense):
            check_model_name(name)  # a bad --dense name fails before any compute
    requested, batch_size = batch_size, _job_batch_size(lm, tokenizer, encoded.prompts, batch_size, remote, max_memory)
    job = Job(model, lm, tokenizer, relations, encoded, remote=remote, batch_size=batch_size, quick=quick,
              max_per_relation=max_per_relation or None, target=target, only_correct=only_correct,
              split=split, dense=dense)
    from nnsight_moe import __version__
    from nnsight_moe.files import digest, model_identity

    identity = {**model_identity(lm), "function": "nnsight_moe.job.run_job",
                "settings": digest([remote, requested, quick, max_per_relation or None, target, only_correct,
                                    split, dense]),
                "job.model": model, "job.data": digest([(r.name, r.prompt_templates, r.samples) for r in relations]),
                "job.version": __version__}
    job.checkpoint = _open_checkpoint(out, identity, fresh)
    layout = job.layout
    header = {
        "model": {
            "name": model,
            "family": layout.family if layout else "dense",
            "model_type": lm.config.model_type,
            "n_layers": lm.config.get_text_config().num_hidden_layers,
            "moe_layers": layout.moe_layers if layout else [],
            "n_experts": layout.n_experts if layout else 0,
            "top_k": layout.top_k if layout else 0,
            "has_shared": bool(layout and layout.has_shared),
        },
        "data": {
            "source": str(data) if data else "bundled",
            "n_facts": len(encoded.facts),
            "relations": [
                {"name": r.name, "n_facts": sum(f.relation == r.name for f in encoded.facts),
                 "n_skipped": sum(f.relation == r.name for f, _ in encoded.skipped)}
                for r in relations
            ],
            "skipped": [{"relation": f.relation, "subject": f.subject, "object": f.object, "reason": reason}
                        for f, reason in encoded.skipped],
        },
    }
    n_steps = 1 + len(RECIPE_SECTIONS)
    from nnsight_moe import memory

    with memory.limit(max_memory):  # recipes planned with batch_size="auto" inside use the same budget
        sections = [_step(1, n_steps, "baseline", job,
                          lambda j: _checkpointed(j, "baseline", lambda: baseline_section(j))), *_recipe_sections(job)]
    from nnsight_moe.recipes import claims

    sections.append(claims.section(sections))  # what this run reproduces of the study's claims, from the above
    job.predictions()  # cached; recomputed once when every section using it was resumed
    header["data"]["selection"] = job.selection()
    header["data"]["skipped_per_relation"] = encoded.skipped_per_relation()
    results = write(out, header, sections, started)
    shutil.rmtree(job.checkpoint, ignore_errors=True)  # the run is complete: nothing to resume
    print(f"wrote {out / 'results.json'} and {out / 'report.html'} ({results['runtime_s']} s)")
    return results


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
