"""Prototype of a demo trio that can ask the study's questions (NOT the bundled demo; writes to --out).

    python -m nnsight_moe.demo.faithful --out /tmp/faithful        # three models, a few minutes on a CPU
    nnsight-moe run --model /tmp/faithful/faithful-moe --dense /tmp/faithful/faithful-dense-12 --out res

What differs from :mod:`nnsight_moe.demo.train` (same tokenizer, relations and training loop):

* depth: the MoE and one dense model have 8 layers, a second dense model 12 (the depth confound);
* not saturated: label smoothing on every next-token loss (``label_smoothing``), so p(target) stays
  well below 1 and late layers are not capped by ``LPI <= -log p(w | x)``;
* held-out templates: each relation's last template is left out of training (``metrics.json`` has
  the MRR on the training templates and on the held-out one);
* knowledge in the layers: input embeddings frozen at their random initialisation (as the demo).

This is a measurement aid: the bundled demo models, and the tests that assert their numbers, are
unchanged. :func:`main` prints what the job needs to compare them.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import replace
from pathlib import Path

import torch

from nnsight_moe.demo import train as base

FAITHFUL = {"layers": 8, "dense_layers": (8, 12), "label_smoothing": 0.2, "steps": 600}


def _split_templates(relations):
    """(training relations: all templates but the last; held-out relations: the last template only)."""
    return ([replace(r, prompt_templates=r.prompt_templates[:-1]) for r in relations],
            [replace(r, prompt_templates=r.prompt_templates[-1:]) for r in relations])


def _train_one(kind: str, layers: int, tokenizer, seqs, positions, cfg):
    saved = base.LAYERS
    base.LAYERS = layers  # make_config reads the module's depth
    try:
        model = base.build_model(kind, tokenizer, cfg["seed"])
    finally:
        base.LAYERS = saved
    log = base.train_model(model, seqs, positions, tokenizer.pad_token_id, cfg, log_every=0)
    return model, log


def main(argv=None) -> dict:
    """Train faithful-moe (8 layers), faithful-dense-8 and faithful-dense-12 into ``--out``."""
    parser = argparse.ArgumentParser(prog="python -m nnsight_moe.demo.faithful")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=FAITHFUL["steps"])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True, warn_only=True)
    relations = base.bundled()
    tokenizer = base.wrap_tokenizer(base.build_tokenizer(relations))
    train_rel, held_rel = _split_templates(relations)
    seqs, positions = base.training_sequences(train_rel, tokenizer)
    cfg = dict(base.TRAIN, steps=args.steps, label_smoothing=FAITHFUL["label_smoothing"])
    out = {}
    plan = [("moe", FAITHFUL["layers"], "faithful-moe")] + [("dense", n, f"faithful-dense-{n}")
                                                           for n in FAITHFUL["dense_layers"]]
    for kind, layers, name in plan:
        model, log = _train_one(kind, layers, tokenizer, seqs, positions, cfg)
        folder = args.out / name
        size = base.save_model(model, folder)
        tokenizer.save_pretrained(folder)
        metrics = {"model": name, "layers": layers, "weights_bytes": size, "training": {**cfg, "final": log},
                   "eval_train_templates": base.evaluate(model, tokenizer, train_rel)["overall"],
                   "eval_held_out_template": base.evaluate(model, tokenizer, held_rel)["overall"]}
        (folder / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
        out[name] = metrics
        print(name, json.dumps({k: metrics[k] for k in ("eval_train_templates", "eval_held_out_template")}),
              f"{log['seconds']} s", flush=True)
    return out


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
