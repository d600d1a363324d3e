"""The faithful demo trio: an 8-layer MoE and 8- and 12-layer dense models that can ask the study's questions.

    from nnsight_moe import demo
    moe, tok = demo.load("faithful-moe")          # Qwen2MoeForCausalLM, 8 layers, 8 routed experts (top-2) + shared
    dense, _ = demo.load("faithful-dense")        # dense (LlamaForCausalLM, Qwen2 math), 8 layers
    dense12, _ = demo.load("faithful-dense-12")   # the same, 12 layers (the depth confound)
    python -m nnsight_moe.demo.faithful           # retrain all three (deterministic; a few minutes on one thread)
    nnsight-moe run --model faithful-moe          # compared with both dense models by default

Same tokenizer (identical vocabulary) and relations as :mod:`nnsight_moe.demo.train`; what differs, and why:

* **depth**: 8 layers (MoE and ``faithful-dense``) and 12 (``faithful-dense-12``), so the efficiency
  forms of :mod:`nnsight_moe.recipes.efficiency` can be compared at equal and at unequal depth;
* **not saturated**: label smoothing :data:`TRAIN` ``label_smoothing`` on every next-token loss, so the
  optimum is p(target) = 1 - eps + eps / V, and late layers are not capped by ``LPI <= -log p(w | x)``;
* **knowledge in the layers**: input embeddings frozen at their seeded random initialisation (as the
  demo), so facts cannot be stored in the subject embeddings;
* **a shared expert with a general role, BY CONSTRUCTION** (routed dropout): for a random fraction
  ``routed_dropout`` of the MoE's training sequences the routed sum is zeroed in every layer (a forward
  hook on ``mlp.experts``), and the target of such a sequence is the relation's *range prior* (the
  distribution of its objects' first tokens) instead of the fact's object; the prompt tokens keep
  their next-token loss. The shared experts (with attention) must therefore carry the general
  processing (template continuation, which kind of answer the relation asks for) on their own, and the
  routed experts add the specific fact on top. The dense models get the same data and loss without
  this (they have no routed experts);
* **held-out template**: each relation's zero-shot template (``prompt_templates_zs``) is never trained
  on; ``metrics.json`` gives the MRR on it next to the MRR on the training templates.

Everything is seeded and runs on one thread with ``torch.use_deterministic_algorithms``: a rerun on the
same machine and torch version gives the same bytes (tested on a short run). ``metrics.json`` next to
each model records the training settings and time and what :func:`measure` computes (the tests recompute
it from the weights).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import torch

from nnsight_moe.demo import train as base

__all__ = ["MODELS", "TRAIN", "build_model", "main", "make_config", "measure", "range_prior", "train_model", "train_one",
           "training_data"]

# Shape. Width 64 keeps the three models at a few MB; the MoE's per-token MLP width (2 x 32 routed +
# 128 shared) equals the dense MLP width, and the shared expert is 4x a routed expert, as in
# Qwen1.5-MoE-A2.7B (shared 5632 = 4 x 1408).
HIDDEN, HEADS, KV_HEADS = 64, 4, 2
NUM_EXPERTS, TOP_K, MOE_INTERMEDIATE, SHARED_INTERMEDIATE = 8, 2, 32, 128
DENSE_INTERMEDIATE = TOP_K * MOE_INTERMEDIATE + SHARED_INTERMEDIATE
AUX_LOSS_COEF = 0.02
#: name -> (kind, layers)
MODELS = {"faithful-moe": ("moe", 8), "faithful-dense": ("dense", 8), "faithful-dense-12": ("dense", 12)}

TRAIN = {
    "seed": 4321,
    "steps": 800,
    "batch_size": 64,
    "lr": 3e-3,
    "warmup": 100,
    "weight_decay": 0.01,
    "grad_clip": 1.0,
    "target_loss_weight": 1.0,
    "label_smoothing": 0.2,
    "routed_dropout": 0.25,  # MoE only: share of sequences trained with the routed sum zeroed (shared only)
    "freeze_input_embeddings": True,
}


# -------------------------------------------------------------------------------------------- model
def make_config(kind: str, layers: int, tokenizer):
    """The HF config of a faithful model: ``kind`` "moe" (Qwen2MoeConfig) or "dense" (LlamaConfig, Qwen2 math)."""
    from transformers import LlamaConfig, Qwen2MoeConfig

    if isinstance(layers, bool) or not isinstance(layers, int) or layers < 1:
        raise ValueError(f"layers must be a positive integer, got {layers!r}")
    common = dict(vocab_size=len(tokenizer), hidden_size=HIDDEN, num_hidden_layers=layers, num_attention_heads=HEADS,
                  num_key_value_heads=KV_HEADS, max_position_embeddings=base.MAX_POSITIONS, tie_word_embeddings=False,
                  pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, use_cache=True)
    if kind == "moe":
        return Qwen2MoeConfig(**common, intermediate_size=DENSE_INTERMEDIATE, num_experts=NUM_EXPERTS,
                              num_experts_per_tok=TOP_K, moe_intermediate_size=MOE_INTERMEDIATE,
                              shared_expert_intermediate_size=SHARED_INTERMEDIATE, norm_topk_prob=False,
                              decoder_sparse_step=1, mlp_only_layers=[], router_aux_loss_coef=AUX_LOSS_COEF,
                              output_router_logits=False)
    if kind == "dense":  # as demo-dense: Qwen2's dense math written as Llama (see nnsight_moe.demo.train.make_config)
        return LlamaConfig(**common, intermediate_size=DENSE_INTERMEDIATE, attention_bias=True,
                           rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    raise ValueError(f"kind must be 'moe' or 'dense', got {kind!r}")


def build_model(name: str, tokenizer, seed: int = TRAIN["seed"]):
    """A freshly initialised (seeded) model for ``name`` in :data:`MODELS`, eager attention and experts."""
    from transformers import LlamaForCausalLM, Qwen2MoeForCausalLM

    if name not in MODELS:
        raise ValueError(f"unknown faithful model {name!r}; available: {', '.join(MODELS)}")
    kind, layers = MODELS[name]
    torch.manual_seed(seed)
    config = make_config(kind, layers, tokenizer)
    config._attn_implementation = "eager"
    if kind == "moe":
        config._experts_implementation = "eager"
    model = (Qwen2MoeForCausalLM if kind == "moe" else LlamaForCausalLM)(config)
    if kind == "dense":  # Qwen2 attention has no output-projection bias: keep Llama's at 0
        for layer in model.model.layers:
            layer.self_attn.o_proj.bias.data.zero_()
            layer.self_attn.o_proj.bias.requires_grad_(False)
    return model


# --------------------------------------------------------------------------------------------- data
def range_prior(relation, tokenizer) -> torch.Tensor:
    """[V] distribution of the relation's target tokens (each fact's object's first token, in context)."""
    from nnsight_moe.data import encode_facts

    enc = encode_facts(tokenizer, relation.facts(0))
    counts = torch.bincount(torch.tensor(enc.targets), minlength=len(tokenizer)).double()
    return (counts / counts.sum()).float()


def training_data(relations, tokenizer) -> dict:
    """Sequences ``[BOS] prompt object [EOS]`` of every fact and training template (as
    :func:`nnsight_moe.demo.train.training_sequences`), each one's target position and relation index,
    and the [R, V] range priors."""
    seqs, positions = base.training_sequences(relations, tokenizer)
    rel_index = [r for r, rel in enumerate(relations) for _ in rel.facts()]
    assert len(rel_index) == len(seqs)
    priors = torch.stack([range_prior(rel, tokenizer) for rel in relations])
    return {"seqs": seqs, "positions": positions, "relation": torch.tensor(rel_index), "priors": priors}


class _RoutedDropout:
    """Forward hook on ``mlp.experts``: multiplies the routed sum of every token by ``keep`` ([B*S, 1])."""

    def __init__(self):
        self.keep: torch.Tensor | None = None

    def __call__(self, module, args, output):
        return output if self.keep is None else output * self.keep.to(output.dtype)


def train_model(model, data: dict, pad_id: int, cfg: dict = TRAIN, log_every: int = 0) -> dict:
    """Train ``model`` in place on :func:`training_data`; returns a log (final losses, steps, seconds).

    Loss: label-smoothed next-token cross entropy on the whole sequence plus ``target_loss_weight`` x
    that of the target position, plus the MoE's load-balancing aux loss. With ``routed_dropout`` > 0
    (MoE only), that share of each batch's sequences runs with every layer's routed sum zeroed and
    its target position (and the object tokens after it) scored against the relation's range prior.
    """
    import torch.nn.functional as F

    torch.manual_seed(cfg["seed"])
    gen = torch.Generator().manual_seed(cfg["seed"])
    if cfg.get("freeze_input_embeddings"):
        model.get_input_embeddings().weight.requires_grad_(False)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in params if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in params if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg["lr"], betas=(0.9, 0.98))
    steps, warmup = cfg["steps"], cfg["warmup"]
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    is_moe = getattr(model.config, "num_experts", None) is not None
    dropout = cfg.get("routed_dropout", 0.0) if is_moe else 0.0
    hook = _RoutedDropout()
    handles = [layer.mlp.experts.register_forward_hook(hook) for layer in model.model.layers] if dropout else []
    seqs, positions, priors, smooth = data["seqs"], data["positions"], data["priors"], cfg["label_smoothing"]
    model.train()
    order, cursor = torch.randperm(len(seqs), generator=gen), 0
    start, log = time.perf_counter(), {}
    try:
        for step in range(steps):
            if cursor + cfg["batch_size"] > len(order):
                order, cursor = torch.randperm(len(seqs), generator=gen), 0
            index = order[cursor: cursor + cfg["batch_size"]].tolist()
            cursor += cfg["batch_size"]
            ids, mask, target_pos = base._batch(seqs, positions, index, pad_id)
            b, width = ids.shape
            dropped = (torch.rand(b, generator=gen) < dropout) if dropout else torch.zeros(b, dtype=torch.bool)
            hook.keep = (~dropped).float()[:, None].expand(b, width).reshape(-1, 1) if dropout else None
            out = model(input_ids=ids, attention_mask=mask, output_router_logits=is_moe)
            logits = out.logits.float()
            labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
            # a dropped sequence: no loss on the object tokens (the fact is not available to it)
            after = torch.arange(width - 1)[None, :] >= target_pos[:, None]
            labels = labels.masked_fill(dropped[:, None] & after, -100)
            lm_loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=-100,
                                      label_smoothing=smooth)
            rows = torch.arange(b)
            gold = F.one_hot(ids[rows, target_pos + 1], logits.shape[-1]).float()
            soft = torch.where(dropped[:, None], priors[data["relation"][index]], gold)
            soft = (1 - smooth) * soft + smooth / logits.shape[-1]
            target_loss = -(soft * logits[rows, target_pos].log_softmax(-1)).sum(-1).mean()
            loss = lm_loss + cfg["target_loss_weight"] * target_loss
            aux = out.aux_loss if is_moe else None
            if aux is not None:
                loss = loss + model.config.router_aux_loss_coef * aux
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for _, p in params], cfg["grad_clip"])
            opt.step()
            sched.step()
            log = {"step": step + 1, "lm_loss": round(lm_loss.item(), 5), "target_loss": round(target_loss.item(), 5)}
            if aux is not None:
                log["aux_loss"] = round(aux.item(), 5)
            if log_every and ((step + 1) % log_every == 0 or step == 0):
                print("  " + "  ".join(f"{k}={v}" for k, v in log.items()), flush=True)
    finally:
        for handle in handles:
            handle.remove()
    model.eval()
    model.get_input_embeddings().weight.requires_grad_(True)
    seconds = time.perf_counter() - start
    log["seconds"] = round(seconds, 1)
    log["seconds_per_step"] = round(seconds / max(steps, 1), 4)
    return log


# ------------------------------------------------------------------------------------------ measure
def _mrr(model, tokenizer, enc) -> float:
    """Pooled MRR of encoded facts at their last prompt position (:func:`nnsight_moe.recipes.metrics.mrr`)."""
    from nnsight_moe.recipes.metrics import mrr

    return round(mrr(base.last_logits(model, tokenizer, enc.prompts), torch.tensor(enc.targets)), 4)


@torch.no_grad()
def measure(model, tokenizer, relations=None) -> dict:
    """What ``metrics.json`` records about a faithful model, computed from its weights.

    * ``eval``: MRR / accuracy on the training templates (every fact), overall and per relation, and the
      mean p(target) of the real output;
    * ``held_out_template``: MRR / accuracy on each relation's zero-shot template (never trained on);
    * ``p_by_layer_mean``: mean p(target) of the frozen-final-norm readout of h^0..h^L
      (:func:`nnsight_moe.recipes.efficiency.telescoping`), training templates;
    * ``chance``: the MRR of a uniformly random rank among V tokens, and of ranking by the relation's
      range prior (its objects' target-token frequencies; ties broken at random, in expectation);
    * MoE only, ``ablation`` (via :func:`nnsight_moe.restrict_experts`): pooled MRR with the shared experts
      off (routing unchanged) and with every routed expert off (shared only).
    """
    import nnsight_moe
    from nnsight_moe.data import bundled, encode_facts
    from nnsight_moe.recipes import efficiency

    relations = bundled() if relations is None else relations
    enc = encode_facts(tokenizer, [f for r in relations for f in r.facts()])
    ev = base.evaluate(model, tokenizer, relations)
    logits = base.last_logits(model, tokenizer, enc.prompts)
    ev["overall"]["p_target_mean"] = round(float(logits.softmax(-1).gather(1, torch.tensor(enc.targets)[:, None]).mean()), 4)
    zs = [base.Relation(r.name, list(r.prompt_templates_zs), r.samples) for r in relations if r.prompt_templates_zs]
    held = base.evaluate(model, tokenizer, zs)["overall"] if zs else None
    tele = efficiency.telescoping(model, enc.prompts, enc.targets, tokenizer=tokenizer, batch_size=256)
    vocab = model.config.vocab_size
    prior_rr = []
    for rel in relations:
        prior = range_prior(rel, tokenizer).double()
        e = encode_facts(tokenizer, rel.facts())
        t = torch.tensor(e.targets)
        p_t = prior[t][:, None]
        greater, ties = (prior[None, :] > p_t).sum(1), (prior[None, :] == p_t).sum(1)  # ties include the target
        # expected reciprocal rank when ties are broken at random: mean of 1/k over k = greater+1 .. greater+ties
        prior_rr.append(torch.tensor([sum(1 / k for k in range(g + 1, g + e + 1)) / e
                                      for g, e in zip(greater.tolist(), ties.tolist())], dtype=torch.float64))
    out = {"eval": ev, "held_out_template": held, "p_by_layer_mean": [round(p, 4) for p in tele["p_by_layer_mean"]],
           "chance": {"uniform_mrr": round(sum(1 / r for r in range(1, vocab + 1)) / vocab, 4),
                      "range_prior_mrr": round(float(torch.cat(prior_rr).mean()), 4)}}
    if getattr(model.config, "num_experts", None):
        with nnsight_moe.restrict_experts(model, shared=False):
            shared_off = _mrr(model, tokenizer, enc)
        with nnsight_moe.restrict_experts(model, 0):
            routed_off = _mrr(model, tokenizer, enc)
        out["ablation"] = {"shared_off_mrr": shared_off, "routed_off_mrr": routed_off}
    return out


# --------------------------------------------------------------------------------------------- main
def train_one(name: str, tokenizer, relations, cfg: dict = TRAIN, log_every: int = 0):
    """``(model, log)``: build and train one faithful model (``name`` in :data:`MODELS`)."""
    model = build_model(name, tokenizer, cfg["seed"])
    log = train_model(model, training_data(relations, tokenizer), tokenizer.pad_token_id, cfg, log_every)
    return model, log


def main(argv: list[str] | None = None) -> dict:
    """Train, measure and write the faithful trio (or ``--only`` some) under ``--out``; returns the metrics."""
    parser = argparse.ArgumentParser(prog="python -m nnsight_moe.demo.faithful", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=base.DEFAULT_OUT, help=f"output directory (default {base.DEFAULT_OUT})")
    parser.add_argument("--steps", type=int, default=TRAIN["steps"], help="optimizer steps per model")
    parser.add_argument("--only", choices=list(MODELS), action="append", help="train only these (repeatable)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True, warn_only=True)
    relations = base.bundled()
    tokenizer = base.wrap_tokenizer(base.build_tokenizer(relations))
    cfg = dict(TRAIN, steps=args.steps)
    results = {}
    for name in args.only or list(MODELS):
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        print(f"training {name} ({MODELS[name][1]} layers, {cfg['steps']} steps) ...", flush=True)
        model, log = train_one(name, tokenizer, relations, cfg, log_every=200)
        folder = args.out / name
        size = base.save_model(model, folder)
        tokenizer.save_pretrained(folder)
        metrics = {"model": name, "architecture": type(model).__name__, "layers": MODELS[name][1], "dtype": "float32",
                   "weights_bytes": size, "params": base.param_counts(model),
                   "training": {**cfg, "final": log, "seconds": log["seconds"], "seconds_per_step": log["seconds_per_step"],
                                "torch": torch.__version__, "threads": torch.get_num_threads(),
                                "machine": platform.machine(), "load_average_at_start": load},
                   **measure(model, tokenizer, relations)}
        (folder / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
        results[name] = metrics
        print(f"{name}: {size / 1e6:.2f} MB, {log['seconds']} s ({log['seconds_per_step']} s/step); MRR "
              f"{metrics['eval']['overall']['mrr']} (held-out template {metrics['held_out_template']['mrr']}), "
              f"p(target) {metrics['eval']['overall']['p_target_mean']}; p by layer {metrics['p_by_layer_mean']}"
              + (f"; ablation {metrics['ablation']}" if "ablation" in metrics else "")
              + f"; chance {metrics['chance']}", flush=True)
    return results


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
