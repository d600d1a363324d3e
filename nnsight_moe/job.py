"""The main job behind ``nnsight-moe run``: open a model and relations, run every recipe, write a report.

Sections, each skipped with a note when it does not apply (e.g. a dense model has no experts):

* ``baseline``: MRR / HIT@10 of the target per relation, and the expert load per MoE layer;
* the recipes in :data:`RECIPE_SECTIONS` (attribution, blocking, head-expert correlation).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from nnsight_moe.report import Section, write

__all__ = ["RECIPE_SECTIONS", "Job", "check_out_dir", "run_job"]


class Job:
    """What every section gets: the model, tokenizer, encoded facts and options.

    With ``remote`` set, ``model`` is an nnsight ``LanguageModel`` (its weights may be on the meta
    device, with NDIF) and every section runs through ``model.trace(..., remote=remote)``.
    """

    def __init__(self, name, model, tokenizer, relations, encoded, *, remote=None, batch_size=16, quick=False,
                 max_per_relation: int | None = 24):
        import nnsight_moe

        self.name, self.model, self.tokenizer = name, model, tokenizer
        self.relations, self.encoded = relations, encoded
        self.remote, self.batch_size, self.quick = remote, batch_size, quick
        #: prompts per relation the recipes use (None: all); the baseline always uses every fact
        self.max_per_relation = 8 if quick else max_per_relation
        try:
            self.layout = nnsight_moe.layout(model)
        except nnsight_moe.UnsupportedModelError:
            self.layout = None  # dense model: only the sections that need no experts run

    @property
    def is_moe(self) -> bool:
        return self.layout is not None

    def by_relation(self) -> dict[str, list[int]]:
        """Fact indices (into ``encoded``) per relation name."""
        groups: dict[str, list[int]] = {}
        for i, fact in enumerate(self.encoded.facts):
            groups.setdefault(fact.relation, []).append(i)
        return groups

    def sample(self):
        """The encoded facts the recipes run on: at most ``max_per_relation`` per relation, evenly spread."""
        from nnsight_moe.data import EncodedFacts, evenly_spaced

        if self.max_per_relation is None:
            return self.encoded
        keep = sorted(i for indices in self.by_relation().values() for i in evenly_spaced(indices, self.max_per_relation))
        enc = self.encoded
        return EncodedFacts(facts=[enc.facts[i] for i in keep], prompts=[enc.prompts[i] for i in keep],
                            targets=[enc.targets[i] for i in keep], skipped=list(enc.skipped))

    @torch.no_grad()
    def last_logits(self, indices: list[int] | None = None, desc: str = "forward") -> torch.Tensor:
        """Last-position logits [P, V] for the encoded prompts (left padding, batched)."""
        from nnsight_moe.recipes.prompts import last_positions

        prompts = self.encoded.prompts if indices is None else [self.encoded.prompts[i] for i in indices]
        device = next(self.model.parameters()).device
        rows = []
        for start in tqdm(range(0, len(prompts), self.batch_size), desc=desc, leave=False):
            batch = self.tokenizer(prompts[start : start + self.batch_size], return_tensors="pt", padding=True)
            batch = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
            logits = self.model(**batch).logits
            last = last_positions(batch["attention_mask"])
            rows.append(logits[torch.arange(logits.shape[0]), last].float().cpu())
        return torch.cat(rows)


def baseline_section(job: Job) -> Section:
    """MRR and HIT@10 per relation; expert load (routing frequency) per MoE layer."""
    import matplotlib.pyplot as plt
    import pandas as pd

    from nnsight_moe.recipes.metrics import hits_of_ranks, mrr_of_ranks, target_ranks

    if job.remote is not None:
        ranks, load = _baseline_remote(job)
    else:
        ranks = target_ranks(job.last_logits(desc="baseline"), torch.tensor(job.encoded.targets))
        load = routing_load(job) if job.is_moe else None

    def metrics(r):
        return {"MRR": mrr_of_ranks(r), "HIT@10": hits_of_ranks(r, 10)}

    rows = [{"relation": relation, "facts": len(idx), **metrics(ranks[idx])} for relation, idx in job.by_relation().items()]
    rows.append({"relation": "all", "facts": len(ranks), **metrics(ranks)})
    table = pd.DataFrame(rows).set_index("relation")
    section = Section("baseline", "Knowledge of the relations (no intervention)",
                      "Rank of the target's first token among the last-position logits."
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


@torch.no_grad()
def routing_load(job: Job) -> torch.Tensor:
    """Share of routed slots per expert, [MoE layers, E], over all non-pad prompt tokens."""
    import nnsight_moe

    layers = job.layout.moe_layers
    counts = torch.zeros(len(layers), job.layout.n_experts)
    device = next(job.model.parameters()).device
    with nnsight_moe.attached(job.model) as handle:
        points = [handle.block(i).hook_topk_indices for i in layers]
        mask_holder: dict[str, torch.Tensor] = {}

        def count(row):
            def hook(indices, hook):
                keep = mask_holder["mask"].bool()
                chosen = indices[keep].reshape(-1).cpu()
                counts[row] += torch.bincount(chosen, minlength=counts.shape[1]).float()
            return hook

        for row, point in enumerate(points):
            point.add_hook(count(row))
        try:
            prompts = job.encoded.prompts
            for start in range(0, len(prompts), job.batch_size):
                batch = job.tokenizer(prompts[start : start + job.batch_size], return_tensors="pt", padding=True)
                mask_holder["mask"] = batch["attention_mask"].to(device)
                job.model(input_ids=batch["input_ids"].to(device), attention_mask=mask_holder["mask"])
        finally:
            for point in points:
                point.remove_hooks()
    return counts / counts.sum(dim=1, keepdim=True).clamp(min=1)


def _baseline_remote(job: Job) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Target ranks [P] and expert load [MoE layers, E] computed inside ``job.model.trace`` (remote)."""
    import functools

    from nnsight_moe.recipes.prompts import encode_prompts, last_positions
    from nnsight_moe.remote import MoEView, run_batches

    prompts, targets = job.encoded.prompts, torch.tensor(job.encoded.targets)
    batches, extras = [], []
    for start in range(0, len(prompts), job.batch_size):
        batch = encode_prompts(job.tokenizer, prompts[start : start + job.batch_size], "cpu")
        batches.append(batch)
        extras.append({"last": last_positions(batch["attention_mask"]), "target": targets[start : start + job.batch_size],
                       "mask": batch["attention_mask"].bool()})
    view = MoEView(job.model) if job.is_moe else None
    results = run_batches(job.model, batches, functools.partial(_baseline_in_trace, view), extras=extras,
                          remote=job.remote, progress=True)
    ranks = torch.cat([r["rank"] for r in results])
    if view is None:
        return ranks, None
    counts = sum(r["counts"].double() for r in results)
    return ranks, (counts / counts.sum(dim=1, keepdim=True).clamp(min=1)).float()


def _baseline_in_trace(view, model, batch, extra) -> dict:
    """Target ranks and per-layer expert counts over non-pad tokens; runs inside the trace (server side)."""
    out = {}
    if view is not None:
        counts = []
        for layer in view.moe_layers:
            indices = view.layer(layer, want=("topk_indices",))["topk_indices"]
            n_experts = view.spec["layers"][layer]["n_experts"]
            counts.append(torch.bincount(indices[extra["mask"]].reshape(-1), minlength=n_experts))
        out["counts"] = torch.stack(counts)
    last, target = extra["last"], extra["target"]
    picked = model.output.logits[torch.arange(last.shape[0]), last].float()
    out["rank"] = (picked > picked.gather(1, target[:, None])).sum(-1) + 1
    return out


#: Recipe sections: (name, module, function name). A recipe module that is not installed is skipped.
RECIPE_SECTIONS: list[tuple[str, str, str]] = [
    ("attribution", "nnsight_moe.recipes.attribution", "section"),
    ("blocking", "nnsight_moe.recipes.blocking", "section"),
    ("head_expert", "nnsight_moe.recipes.head_expert", "section"),
]


def _recipe_sections(job: Job) -> list[Section]:
    import importlib

    sections = []
    for name, module, function in RECIPE_SECTIONS:
        try:
            make: Callable[[Job], Section | None] = getattr(importlib.import_module(module), function)
        except (ImportError, AttributeError):
            continue
        started = time.time()
        section = make(job)
        print(f"section {name}: {time.time() - started:.1f} s")
        if section is not None:
            sections.append(section)
    return sections


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


def run_job(model: str = "demo-moe", data: str | None = None, out: str | Path = "results", *,
            remote: Any = None, device: str | None = None, dtype: str | None = None,
            batch_size: int = 16, quick: bool = False, max_per_relation: int | None = 24) -> dict:
    """Run the main job and write ``out/results.json`` and ``out/report.html``; returns the results dict."""
    import warnings

    from nnsight_moe import data as relation_data
    from nnsight_moe.models import load_model, load_traced

    started = time.time()
    out = check_out_dir(out)
    relations = relation_data.load_relations(data) if data else relation_data.bundled()
    if not relations:
        raise ValueError(f"no relations found in {data!r}")
    if remote is None:
        lm, tokenizer = load_model(model, device=device, dtype=dtype)
    else:  # an nnsight LanguageModel: every section runs through model.trace(..., remote=remote)
        lm, tokenizer = load_traced(model, remote, device=device, dtype=dtype)
    facts = [fact for relation in relations for fact in relation.facts()]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        encoded = relation_data.encode_facts(tokenizer, facts)
    for warning in caught:
        print(f"warning: {warning.message}")
    if not encoded.facts:
        raise ValueError("no fact has a known target token for this tokenizer; nothing to run")
    job = Job(model, lm, tokenizer, relations, encoded, remote=remote, batch_size=batch_size, quick=quick,
              max_per_relation=max_per_relation or None)
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
    sections = [baseline_section(job), *_recipe_sections(job)]
    results = write(out, header, sections, started)
    print(f"wrote {out / 'results.json'} and {out / 'report.html'} ({results['runtime_s']} s)")
    return results


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
