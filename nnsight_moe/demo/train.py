"""Train the two embedded demo models on the bundled relations (deterministic, CPU, a few minutes).

    python -m nnsight_moe.demo.train                 # rewrites nnsight_moe/demo/models/demo-{moe,dense}
    python -m nnsight_moe.demo.train --out /tmp/demo  # somewhere else

What it does:

1. builds a word-level tokenizer (``tokenizers`` WordLevel model, Whitespace pre-tokenizer, special
   tokens ``[PAD] [UNK] [BOS] [EOS]``, ``[BOS]`` prepended by the post-processor) whose vocabulary is
   every word of the bundled relations' templates, subjects and objects;
2. trains ``demo-moe`` (``Qwen2MoeForCausalLM``: 8 routed experts, top-2, plus a sigmoid-gated shared
   expert, as in Qwen1.5-MoE) and ``demo-dense`` (Qwen2's dense architecture as ``LlamaForCausalLM`` with the same depth/width and an
   MLP sized to the MoE's ACTIVE parameters per token) on ``[BOS] prompt object [EOS]`` for every fact
   and every prompt template, with next-token loss on the whole sequence plus an extra loss on the
   target (first object) token, and for the MoE the load-balancing aux loss;
3. measures target top-1 accuracy and MRR (rank of the target's first token among the last-position
   logits of the left-padded prompt) per relation and writes ``metrics.json`` next to each model.

Everything is seeded, runs on one thread with ``torch.use_deterministic_algorithms``, so a rerun on
the same machine and torch version reproduces the weights; other CPUs/BLAS builds may differ in the
last bits.
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

from nnsight_moe.data import Relation, bundled, encode_facts

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
DEFAULT_OUT = Path(__file__).resolve().parent / "models"

# Shared shape of both models.
HIDDEN = 128
LAYERS = 4
HEADS = 2
KV_HEADS = 1
MAX_POSITIONS = 128
# MoE: 8 experts, top-2, expert width 64, shared expert width 32 (most MLP capacity is routed).
NUM_EXPERTS = 8
TOP_K = 2
MOE_INTERMEDIATE = 64
SHARED_INTERMEDIATE = 32
AUX_LOSS_COEF = 0.02
# Dense MLP width = active routed + shared width per token (2 * 64 + 32), so the MLP parameters a
# token uses match (the MoE adds only its router and shared-expert gate).
DENSE_INTERMEDIATE = TOP_K * MOE_INTERMEDIATE + SHARED_INTERMEDIATE

TRAIN = {
    "seed": 1234,
    "steps": 600,
    "batch_size": 64,
    "lr": 3e-3,
    "warmup": 100,
    "weight_decay": 0.01,
    "grad_clip": 1.0,
    "target_loss_weight": 1.0,
    # Input embeddings stay at their (seeded) random initialisation. With trainable embeddings a model
    # this small stores every fact in the subject embeddings and reads it out through attention, so
    # its MLPs / experts could be removed without loss; frozen embeddings push the facts into the
    # layers, which makes the routed experts matter (see routing.knockout_mrr in metrics.json).
    "freeze_input_embeddings": True,
}


# ------------------------------------------------------------------------------------- tokenizer


def vocabulary(relations: list[Relation]) -> list[str]:
    """Special tokens, then every word (Whitespace pre-tokenizer) of templates, subjects and objects."""
    from tokenizers.pre_tokenizers import Whitespace

    pre = Whitespace()
    words: set[str] = set()

    def add(text: str) -> None:
        words.update(w for w, _ in pre.pre_tokenize_str(text))

    for rel in relations:
        for template in rel.prompt_templates + rel.prompt_templates_zs:
            add(template.replace("{}", " "))
        for subject, obj in rel.samples:
            add(subject)
            add(obj)
    return SPECIAL_TOKENS + sorted(words - set(SPECIAL_TOKENS))


def build_tokenizer(relations: list[Relation]):
    """A ``tokenizers.Tokenizer`` (WordLevel + Whitespace, ``[BOS]`` prepended) over the relations' words."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from tokenizers.processors import TemplateProcessing

    vocab = {w: i for i, w in enumerate(vocabulary(relations))}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    tok.post_processor = TemplateProcessing(
        single="[BOS] $A", pair="[BOS] $A $B", special_tokens=[("[BOS]", vocab["[BOS]"])]
    )
    tok.add_special_tokens(SPECIAL_TOKENS)
    return tok


def wrap_tokenizer(tok_or_file):
    """A ``transformers.PreTrainedTokenizerFast`` around a Tokenizer or tokenizer.json (left padding)."""
    from transformers import PreTrainedTokenizerFast

    kwargs = {"tokenizer_file": str(tok_or_file)} if isinstance(tok_or_file, (str, Path)) else {
        "tokenizer_object": tok_or_file
    }
    return PreTrainedTokenizerFast(
        **kwargs,
        bos_token="[BOS]",
        eos_token="[EOS]",
        unk_token="[UNK]",
        pad_token="[PAD]",
        padding_side="left",
        model_max_length=MAX_POSITIONS,
    )


# ----------------------------------------------------------------------------------------- models


def make_config(kind: str, tokenizer):
    """The HF config of ``demo-moe`` (kind "moe") or ``demo-dense`` (kind "dense")."""
    from transformers import LlamaConfig, Qwen2MoeConfig

    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        use_cache=True,
    )
    if kind == "moe":
        return Qwen2MoeConfig(
            **common,
            intermediate_size=DENSE_INTERMEDIATE,  # unused: every layer is sparse (decoder_sparse_step=1)
            num_experts=NUM_EXPERTS,
            num_experts_per_tok=TOP_K,
            moe_intermediate_size=MOE_INTERMEDIATE,
            shared_expert_intermediate_size=SHARED_INTERMEDIATE,
            norm_topk_prob=False,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            router_aux_loss_coef=AUX_LOSS_COEF,
            output_router_logits=False,
        )
    if kind == "dense":
        # Qwen2's dense architecture written as Llama (q/k/v biases; the o_proj bias Llama adds with them
        # stays 0, see build_model): same math, but transformers' AutoTokenizer honours the folder's
        # tokenizer_config.json for model_type "llama", while for "qwen2" it forces the BPE Qwen2Tokenizer.
        return LlamaConfig(**common, intermediate_size=DENSE_INTERMEDIATE, attention_bias=True,
                           rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    raise ValueError(f"kind must be 'moe' or 'dense', got {kind!r}")


def build_model(kind: str, tokenizer, seed: int):
    """A freshly initialised model of ``kind`` (seeded), eager attention and experts."""
    from transformers import LlamaForCausalLM, Qwen2MoeForCausalLM

    torch.manual_seed(seed)
    cls = Qwen2MoeForCausalLM if kind == "moe" else LlamaForCausalLM
    config = make_config(kind, tokenizer)
    config._attn_implementation = "eager"
    if kind == "moe":
        config._experts_implementation = "eager"
    model = cls(config)
    if kind == "dense":  # Qwen2 attention has no output-projection bias: keep Llama's at 0
        for layer in model.model.layers:
            layer.self_attn.o_proj.bias.data.zero_()
            layer.self_attn.o_proj.bias.requires_grad_(False)
    return model


def param_counts(model) -> dict:
    """Total parameters and parameters used per token (embeddings excluded from 'active_non_embedding')."""
    cfg = model.config
    total = sum(p.numel() for p in model.parameters())
    embed = model.get_input_embeddings().weight.numel() + model.get_output_embeddings().weight.numel()
    non_embed = total - embed
    out = {"total": total, "embeddings_in_out": embed, "non_embedding": non_embed}
    if getattr(cfg, "num_experts", None):
        per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
        inactive = cfg.num_hidden_layers * (cfg.num_experts - cfg.num_experts_per_tok) * per_expert
        out["routed_expert_params_per_expert_per_layer"] = per_expert
        out["active_non_embedding"] = non_embed - inactive
    else:
        out["active_non_embedding"] = non_embed
    return out


# ------------------------------------------------------------------------------------------- data


def training_sequences(relations: list[Relation], tokenizer) -> tuple[list[list[int]], list[int]]:
    """Token ids of ``[BOS] prompt object [EOS]`` for every fact and template, and each target position.

    The target position is the index of the last prompt token (whose next-token logits must give the
    object's first token).
    """
    facts = [f for rel in relations for f in rel.facts()]
    enc = encode_facts(tokenizer, facts)
    if enc.skipped:
        raise RuntimeError(f"{len(enc.skipped)} bundled facts have no target token: {enc.skipped[:3]}")
    seqs, positions = [], []
    for fact, target in zip(enc.facts, enc.targets):
        prompt_ids = tokenizer(fact.prompt)["input_ids"]  # [BOS] + prompt
        obj_ids = tokenizer(" " + fact.object, add_special_tokens=False)["input_ids"]
        assert obj_ids[0] == target
        seqs.append(prompt_ids + obj_ids + [tokenizer.eos_token_id])
        positions.append(len(prompt_ids) - 1)
    return seqs, positions


def _batch(seqs, positions, index, pad_id):
    rows = [seqs[i] for i in index]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for j, row in enumerate(rows):  # right padding for training (RoPE is relative, masks hide pads)
        ids[j, : len(row)] = torch.tensor(row)
        mask[j, : len(row)] = 1
    target_pos = torch.tensor([positions[i] for i in index])
    return ids, mask, target_pos


def train_model(model, seqs, positions, pad_id, cfg: dict, log_every: int = 250) -> dict:
    """Train in place; returns a small log (final losses, steps, seconds)."""
    torch.manual_seed(cfg["seed"])
    gen = torch.Generator().manual_seed(cfg["seed"])
    if cfg.get("freeze_input_embeddings"):
        model.get_input_embeddings().weight.requires_grad_(False)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in params if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in params if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg["lr"], betas=(0.9, 0.98),
    )
    steps, warmup = cfg["steps"], cfg["warmup"]
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    is_moe = getattr(model.config, "num_experts", None) is not None
    model.train()
    order, cursor = torch.randperm(len(seqs), generator=gen), 0
    start, log = time.perf_counter(), {}
    for step in range(steps):
        if cursor + cfg["batch_size"] > len(order):
            order, cursor = torch.randperm(len(seqs), generator=gen), 0
        index = order[cursor : cursor + cfg["batch_size"]].tolist()
        cursor += cfg["batch_size"]
        ids, mask, target_pos = _batch(seqs, positions, index, pad_id)
        out = model(input_ids=ids, attention_mask=mask, output_router_logits=is_moe) if is_moe else model(
            input_ids=ids, attention_mask=mask
        )
        logits = out.logits.float()
        labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        smooth = cfg.get("label_smoothing", 0.0)  # 0 for demo-moe / demo-dense (the faithful trio trains in demo.faithful)
        lm_loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=-100,
                                                    label_smoothing=smooth)
        rows = torch.arange(len(index))
        target_loss = torch.nn.functional.cross_entropy(logits[rows, target_pos], ids[rows, target_pos + 1],
                                                        label_smoothing=smooth)
        loss = lm_loss + cfg["target_loss_weight"] * target_loss
        aux = out.aux_loss if is_moe else None
        if aux is not None:
            loss = loss + model.config.router_aux_loss_coef * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in params], cfg["grad_clip"])
        opt.step()
        sched.step()
        log = {"step": step + 1, "lm_loss": lm_loss.item(), "target_loss": target_loss.item()}
        if aux is not None:
            log["aux_loss"] = aux.item()
        if log_every and ((step + 1) % log_every == 0 or step == 0):
            print("  " + "  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in log.items()),
                  flush=True)
    model.eval()
    model.get_input_embeddings().weight.requires_grad_(True)
    log["seconds"] = round(time.perf_counter() - start, 1)
    return log


# ------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def last_logits(model, tokenizer, prompts: list[str], batch_size: int = 256) -> torch.Tensor:
    """Last-position logits of each prompt (left padding, [BOS] prepended): [prompts, vocab]."""
    tokenizer.padding_side = "left"
    chunks = []
    for i in range(0, len(prompts), batch_size):
        batch = tokenizer(prompts[i : i + batch_size], return_tensors="pt", padding=True)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        chunks.append(out.logits[:, -1].float())
    return torch.cat(chunks) if chunks else torch.empty(0, model.config.vocab_size)


def evaluate(model, tokenizer, relations: list[Relation]) -> dict:
    """Target top-1 accuracy and MRR per relation and overall (training templates, all facts)."""
    per_relation, all_ranks = {}, []
    for rel in relations:
        enc = encode_facts(tokenizer, rel.facts())
        logits = last_logits(model, tokenizer, enc.prompts)
        targets = torch.tensor(enc.targets)
        ranks = (logits > logits.gather(1, targets[:, None])).sum(1) + 1
        all_ranks.append(ranks)
        per_relation[rel.name] = {
            "prompts": len(enc),
            "accuracy": round(float((ranks == 1).double().mean()), 4),
            "mrr": round(float((1.0 / ranks.double()).mean()), 4),
        }
    ranks = torch.cat(all_ranks)
    overall = {
        "prompts": int(ranks.numel()),
        "accuracy": round(float((ranks == 1).double().mean()), 4),
        "mrr": round(float((1.0 / ranks.double()).mean()), 4),
    }
    return {"overall": overall, "per_relation": per_relation}


@torch.no_grad()
def expert_report(model, tokenizer, relations: list[Relation]) -> dict:
    """Routing statistics of the MoE on the training prompts.

    ``expert_load``: per layer, fraction of top-k slots each expert receives (all prompt tokens);
    ``knockout_mrr``: overall MRR with one routed expert of one layer zeroed ([layer][expert]);
    ``shared_expert_off_mrr``: overall MRR with every shared expert zeroed.
    """
    prompts, targets = [], []
    for rel in relations:
        enc = encode_facts(tokenizer, rel.facts())
        prompts += enc.prompts
        targets += enc.targets
    targets_t = torch.tensor(targets)

    def mrr() -> float:
        logits = last_logits(model, tokenizer, prompts)
        ranks = (logits > logits.gather(1, targets_t[:, None])).sum(1) + 1
        return round(float((1.0 / ranks.double()).mean()), 4)

    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    out = model(**batch, output_router_logits=True)
    keep = batch["attention_mask"].flatten().bool()
    k, n_exp = model.config.num_experts_per_tok, model.config.num_experts
    load = []
    for router_logits in out.router_logits:
        top = router_logits[keep].topk(k, dim=-1).indices.flatten()
        load.append([round(float(x), 4) for x in torch.bincount(top, minlength=n_exp).double() / top.numel()])

    knockout = []
    for layer in model.model.layers:
        experts, row = layer.mlp.experts, []
        for e in range(n_exp):
            saved = experts.down_proj.data[e].clone()
            experts.down_proj.data[e].zero_()
            row.append(mrr())
            experts.down_proj.data[e].copy_(saved)
        knockout.append(row)
    saved = [layer.mlp.shared_expert.down_proj.weight.data.clone() for layer in model.model.layers]
    for layer in model.model.layers:
        layer.mlp.shared_expert.down_proj.weight.data.zero_()
    shared_off = mrr()
    for layer, w in zip(model.model.layers, saved):
        layer.mlp.shared_expert.down_proj.weight.data.copy_(w)
    return {"expert_load": load, "knockout_mrr": knockout, "shared_expert_off_mrr": shared_off}


# ------------------------------------------------------------------------------------------- main


def save_model(model, out_dir: Path) -> int:
    """Write config.json and model.safetensors (float32); returns the safetensors size in bytes."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    gen_cfg = out_dir / "generation_config.json"
    if gen_cfg.exists():
        gen_cfg.unlink()
    return (out_dir / "model.safetensors").stat().st_size


def main(argv: list[str] | None = None) -> dict:
    """Build the tokenizer, train and evaluate both demo models, write them under ``--out``."""
    parser = argparse.ArgumentParser(prog="python -m nnsight_moe.demo.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    parser.add_argument("--steps", type=int, default=TRAIN["steps"], help="optimizer steps per model")
    parser.add_argument("--seed", type=int, default=TRAIN["seed"])
    parser.add_argument("--only", choices=["moe", "dense"], help="train one of the two models only")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True, warn_only=True)
    cfg = dict(TRAIN, steps=args.steps, seed=args.seed)
    relations = bundled()
    raw_tok = build_tokenizer(relations)
    tokenizer = wrap_tokenizer(raw_tok)
    seqs, positions = training_sequences(relations, tokenizer)
    print(f"{len(relations)} relations, {len(seqs)} training sequences, vocabulary {len(tokenizer)}", flush=True)

    results = {}
    for kind, name in (("moe", "demo-moe"), ("dense", "demo-dense")):
        if args.only and kind != args.only:
            continue
        print(f"training {name} ...", flush=True)
        model = build_model(kind, tokenizer, cfg["seed"])
        log = train_model(model, seqs, positions, tokenizer.pad_token_id, cfg)
        out_dir = args.out / name
        size = save_model(model, out_dir)
        tokenizer.save_pretrained(out_dir)  # tokenizer.json + tokenizer_config.json: a plain AutoTokenizer folder
        metrics = {
            "model": name,
            "architecture": type(model).__name__,
            "dtype": "float32",
            "weights_bytes": size,
            "params": param_counts(model),
            "training": {**cfg, "final": log, "seconds": log["seconds"], "torch": torch.__version__,
                         "threads": torch.get_num_threads(), "machine": platform.machine()},
            "data": {"relations": [r.name for r in relations], "sequences": len(seqs),
                     "vocab_size": len(tokenizer)},
            "eval": evaluate(model, tokenizer, relations),
        }
        if kind == "moe":
            metrics["routing"] = expert_report(model, tokenizer, relations)
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        results[name] = metrics
        ev = metrics["eval"]
        print(f"{name}: {metrics['params']['total']:,} params ({metrics['params']['active_non_embedding']:,} active "
              f"non-embedding), {size / 1e6:.2f} MB, {log['seconds']} s", flush=True)
        print(f"  overall accuracy {ev['overall']['accuracy']:.4f}  MRR {ev['overall']['mrr']:.4f}")
        for rel, m in ev["per_relation"].items():
            print(f"  {rel:24s} accuracy {m['accuracy']:.4f}  MRR {m['mrr']:.4f}  ({m['prompts']} prompts)")
        if kind == "moe":
            r = metrics["routing"]
            print(f"  shared expert off: MRR {r['shared_expert_off_mrr']:.4f}; worst single-expert knockout MRR "
                  f"{min(min(row) for row in r['knockout_mrr']):.4f}")
    return results


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
