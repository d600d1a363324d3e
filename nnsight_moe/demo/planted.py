"""A small MoE with planted ground truth: which routed experts hold which relation, by construction.

    from nnsight_moe.demo import planted
    model, tokenizer = planted.load()          # Qwen2MoeForCausalLM, 3 layers, 8 experts (top-2) + shared
    relations = planted.relations()           # 4 relations x 16 subjects x 2 templates
    truth = planted.ground_truth()             # {"experts": {relation: [[layer, expert], ...]}, ...}
    python -m nnsight_moe.demo.planted         # retrain (deterministic, ~40 s on one CPU thread)

**Construction.** The residual stream (d = 96) is cut into four coordinate blocks, and masks on the
weights (zero at initialisation, gradients masked, so they stay exactly zero) fix who may write and
read each block:

=============  ======================================  ==========================================
block          written by                              read by
=============  ======================================  ==========================================
``in``  0:16   the (frozen, random) token embeddings   everyone; the unembedding (constant at the
                                                       last token, which is always ``is``)
``ctx`` 16:48  attention (o_proj rows)                 the shared experts, routers, attention
``feat`` 48:72 the shared experts (down_proj rows)     the ROUTED experts (their only input)
``out`` 72:96  the routed experts (down_proj rows)     the unembedding (its only varying input)
=============  ======================================  ==========================================

Hence at the scored (last) position the logits vary only through the routed experts selected there,
and those see only what the shared experts wrote: the shared expert of layer 0 is the only source of
layer 1's routed-expert input (a sub-task every relation needs), and layer 0's routed experts read an
empty block (their output is exactly 0). During training the last token of relation r is routed to
two planted experts per layer in layers 1 and 2 (a forward hook on the router replaces the choice;
the router is trained to make that choice itself, and does: :func:`routing_agreement` = 1.0), with
each planted slot dropped at random (p = 0.25) so that any one of them can be missing. Therefore,
by construction: blocking relation r's four planted experts removes every fact-dependent term of its
logits (only the constant prior of the ``in`` block is left); blocking other experts does not touch
its last position; switching the shared experts off removes every relation's answer.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from pathlib import Path

import torch

__all__ = ["RELATIONS", "ground_truth", "load", "path", "relations", "routing_agreement", "train"]

FOLDER = Path(__file__).resolve().parent / "models" / "planted-moe"
SEED = 2024
HIDDEN, LAYERS, HEADS, KV_HEADS = 96, 3, 4, 2
EXPERTS, TOP_K, EXPERT_WIDTH, SHARED_WIDTH = 8, 2, 32, 32
BLOCKS = {"in": (0, 16), "ctx": (16, 48), "feat": (48, 72), "out": (72, 96)}
PLANTED_LAYERS = (1, 2)
#: relation -> (relation word, object words); every subject has one object per relation
RELATIONS = {
    "hue": ["red", "blue", "green", "amber", "gray", "pink"],
    "pet": ["cat", "dog", "owl", "fox", "eel", "yak"],
    "ore": ["iron", "tin", "zinc", "lead", "copper", "nickel"],
    "town": ["oslo", "rome", "lima", "baku", "riga", "doha"],
}
SUBJECTS = [f"item{i}" for i in range(16)]
TEMPLATES = ["{rel} of {{}}", "the {rel} of {{}}"]
TRAIN = {"steps": 200, "batch_size": 128, "lr": 1e-2, "warmup": 40, "router_loss": 1.0, "slot_dropout": 0.15,
         "prior_std": 0.1, "init_scale": 5.0}


# ------------------------------------------------------------------------------------------ data
def _facts() -> dict[str, list[tuple[str, str]]]:
    rng = random.Random(SEED)
    return {rel: [(s, rng.choice(objects)) for s in SUBJECTS] for rel, objects in RELATIONS.items()}


def relations():
    """The four planted relations as :class:`nnsight_moe.data.Relation` (2 templates, 16 subjects each)."""
    from nnsight_moe.data import Relation

    return [Relation(rel, [t.format(rel=rel) for t in TEMPLATES], samples) for rel, samples in _facts().items()]


def _assignment() -> dict[str, list[list[int]]]:
    """relation -> planted [layer, expert] pairs: per planted layer a seeded permutation, 2 experts each."""
    rng = random.Random(SEED + 1)
    out: dict[str, list[list[int]]] = {rel: [] for rel in RELATIONS}
    for layer in PLANTED_LAYERS:
        perm = list(range(EXPERTS))
        rng.shuffle(perm)
        for r, rel in enumerate(RELATIONS):
            out[rel] += [[layer, perm[2 * r]], [layer, perm[2 * r + 1]]]
    return out


def path() -> Path:
    """The model folder (config.json, model.safetensors, tokenizer files, planted.json)."""
    missing = [f for f in ("config.json", "model.safetensors", "tokenizer.json", "planted.json") if not (FOLDER / f).is_file()]
    if missing:
        raise FileNotFoundError(f"planted model files {missing} missing in {FOLDER}; rebuild with "
                                "`python -m nnsight_moe.demo.planted`")
    return FOLDER


def ground_truth() -> dict:
    """The planted facts: ``experts`` {relation: [[layer, expert], ...]}, ``planted_layers``, ``blocks``,
    ``dead_layers`` (layers whose routed experts read an empty block) and the training record."""
    return json.loads((path() / "planted.json").read_text())


def load():
    """``(model, tokenizer)`` of the planted model, float32, eval mode, from the package files only."""
    from transformers import AutoModelForCausalLM

    from nnsight_moe import threads
    from nnsight_moe.demo.train import wrap_tokenizer

    model = AutoModelForCausalLM.from_pretrained(path(), local_files_only=True, dtype=torch.float32).eval()
    threads.configure(model=model)
    return model, wrap_tokenizer(path() / "tokenizer.json")


# ------------------------------------------------------------------------------------- structure
def _block(name: str) -> slice:
    lo, hi = BLOCKS[name]
    return slice(lo, hi)


def _masks(model) -> dict[str, torch.Tensor]:
    """Parameter name -> 0/1 mask of the entries that may be non-zero (the construction's wiring)."""
    d = HIDDEN
    rows = lambda *names: torch.zeros(d).index_fill_(0, torch.cat([torch.arange(*BLOCKS[n]) for n in names]), 1.0)  # noqa: E731
    masks = {}
    for name, p in model.named_parameters():
        m = None
        if name.endswith("embed_tokens.weight"):
            m = rows("in")[None, :].expand_as(p)
        elif name.endswith("self_attn.o_proj.weight"):
            m = rows("ctx")[:, None].expand_as(p)
        elif name.endswith("shared_expert.down_proj.weight"):
            m = rows("feat")[:, None].expand_as(p)
        elif name.endswith(("shared_expert.gate_proj.weight", "shared_expert.up_proj.weight")):
            m = rows("in", "ctx")[None, :].expand_as(p)
        elif name.endswith("mlp.experts.gate_up_proj"):  # [E, 2 * I, d]: routed experts read `feat` only
            m = rows("feat")[None, None, :].expand_as(p)
        elif name.endswith("mlp.experts.down_proj"):  # [E, d, I]: they write `out` only
            m = rows("out")[None, :, None].expand_as(p)
        elif name.endswith("lm_head.weight"):  # `out` trained; `in` columns: a frozen random tie-breaker
            m = rows("out")[None, :].expand_as(p)
        if m is not None:
            if m.shape != p.shape:
                raise RuntimeError(f"{name}: mask {tuple(m.shape)} does not fit {tuple(p.shape)}")
            masks[name] = m.contiguous()
    return masks


def prior(shape) -> torch.Tensor:
    """The frozen `in` columns of the unembedding (seeded normal, std ``prior_std``; 0 elsewhere)."""
    values = torch.randn(shape, generator=torch.Generator().manual_seed(SEED + 4)) * TRAIN["prior_std"]
    return values * torch.zeros(HIDDEN).index_fill_(0, torch.arange(*BLOCKS["in"]), 1.0)


def _config(vocab_size: int, tokenizer):
    from transformers import Qwen2MoeConfig

    config = Qwen2MoeConfig(
        vocab_size=vocab_size, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS, max_position_embeddings=32, tie_word_embeddings=False,
        intermediate_size=64, num_experts=EXPERTS, num_experts_per_tok=TOP_K, moe_intermediate_size=EXPERT_WIDTH,
        shared_expert_intermediate_size=SHARED_WIDTH, norm_topk_prob=False, decoder_sparse_step=1,
        mlp_only_layers=[], router_aux_loss_coef=0.0, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    config._attn_implementation = "eager"
    config._experts_implementation = "eager"
    return config


# -------------------------------------------------------------------------------------- training
def _encode(tokenizer, rels):
    """Left-padded prompt ids, mask, target ids, relation index and subject of every fact."""
    from nnsight_moe.data import encode_facts

    enc = encode_facts(tokenizer, [f for r in rels for f in r.facts()])
    if enc.skipped:
        raise RuntimeError(f"planted facts without a target token: {enc.skipped[:3]}")
    batch = tokenizer(enc.prompts, return_tensors="pt", padding=True)
    names = list(RELATIONS)
    rel = torch.tensor([names.index(f.relation) for f in enc.facts])
    return batch["input_ids"], batch["attention_mask"], torch.tensor(enc.targets), rel


class _Forcing:
    """Router forward hook: at the last position of each row, route to the row's planted experts."""

    def __init__(self, layer: int, planted: torch.Tensor, dropout: float, gen: torch.Generator):
        self.layer, self.planted, self.dropout, self.gen = layer, planted, dropout, gen  # planted [R, 2]
        self.rows: torch.Tensor | None = None  # flattened token index of each last position
        self.rel: torch.Tensor | None = None

    def __call__(self, module, args, output):
        logits, scores, indices = output
        if self.rows is None:
            return output
        probs = logits.float().softmax(-1)
        indices = indices.clone()
        scores = scores.clone()
        chosen = self.planted[self.rel]  # [B, 2]
        indices[self.rows] = chosen
        new = probs[self.rows].gather(-1, chosen)
        if self.dropout:
            keep = (torch.rand(new.shape, generator=self.gen) >= self.dropout).float()
            new = new * keep
        scores[self.rows] = new.to(scores.dtype)
        return logits, scores, indices


def train(out: Path = FOLDER, steps: int = TRAIN["steps"]) -> dict:
    """Build the tokenizer, train the planted model deterministically and write it (with planted.json)."""
    from transformers import Qwen2MoeForCausalLM

    from nnsight_moe.demo.train import build_tokenizer, wrap_tokenizer

    torch.manual_seed(SEED)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True, warn_only=True)
    rels = relations()
    tokenizer = wrap_tokenizer(build_tokenizer(rels))
    config = _config(len(tokenizer), tokenizer)
    model = Qwen2MoeForCausalLM(config)
    masks = _masks(model)
    params = dict(model.named_parameters())
    with torch.no_grad():
        emb = params["model.embed_tokens.weight"]
        emb.copy_(torch.randn(emb.shape, generator=torch.Generator().manual_seed(SEED)))
        for name, m in masks.items():
            # the masked paths start larger than HF's std 0.02, or the chain shared -> routed -> readout
            # (each factor small) sits on a long plateau
            params[name].mul_(m * (TRAIN["init_scale"] if "expert" in name else 1.0))
        # the unembedding's `in` columns: frozen small random values, so a prediction without the routed
        # experts is a fixed, fact-free ordering of the vocabulary (not all-tied logits)
        head = params["lm_head.weight"]
        head.add_(prior(head.shape))
    emb.requires_grad_(False)
    for name, m in masks.items():
        if params[name].requires_grad:
            params[name].register_hook(lambda g, m=m: g * m)
    assignment = _assignment()
    names = list(RELATIONS)
    gen = torch.Generator().manual_seed(SEED + 2)
    forcing = {}
    for layer in PLANTED_LAYERS:
        planted = torch.tensor([[e for l, e in assignment[rel] if l == layer] for rel in names])
        forcing[layer] = _Forcing(layer, planted, TRAIN["slot_dropout"], gen)
        model.model.layers[layer].mlp.gate.register_forward_hook(forcing[layer])
    ids, mask, targets, rel = _encode(tokenizer, rels)
    width = ids.shape[1]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=TRAIN["lr"], weight_decay=0.0)
    warm = TRAIN["warmup"]
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    order = torch.Generator().manual_seed(SEED + 3)
    started, log = time.perf_counter(), {}
    model.train()
    for step in range(steps):
        index = torch.randperm(len(ids), generator=order)[: TRAIN["batch_size"]]
        b = len(index)
        rows = torch.arange(b) * width + (width - 1)  # left padding: the last column is the last token
        for f in forcing.values():
            f.rows, f.rel = rows, rel[index]
        outputs = model(input_ids=ids[index], attention_mask=mask[index], output_router_logits=True)
        target_loss = torch.nn.functional.cross_entropy(outputs.logits[:, -1].float(), targets[index])
        router_loss = 0.0
        for layer in PLANTED_LAYERS:  # the router learns the planted choice (both experts as the top-2)
            logp = outputs.router_logits[layer][rows].float().log_softmax(-1)
            router_loss = router_loss - logp.gather(-1, forcing[layer].planted[rel[index]]).mean()
        loss = target_loss + TRAIN["router_loss"] * router_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        log = {"step": step + 1, "target_loss": round(target_loss.item(), 5), "router_loss": round(float(router_loss), 5)}
        if (step + 1) % 50 == 0:
            print(log, flush=True)
    for f in forcing.values():
        f.rows = None
    model.eval()
    seconds = round(time.perf_counter() - started, 1)
    out.mkdir(parents=True, exist_ok=True)
    model.config.router_aux_loss_coef = 0.0
    model.save_pretrained(out, safe_serialization=True)
    (out / "generation_config.json").unlink(missing_ok=True)
    tokenizer.save_pretrained(out)
    truth = {"experts": assignment, "planted_layers": list(PLANTED_LAYERS), "dead_layers": [0], "blocks": BLOCKS,
             "relations": {r.name: {"templates": r.prompt_templates, "samples": r.samples} for r in rels},
             "training": {**TRAIN, "steps": steps, "seed": SEED, "seconds": seconds, "final": log,
                          "torch": torch.__version__},
             "weights_bytes": (out / "model.safetensors").stat().st_size}
    (out / "planted.json").write_text(json.dumps(truth, indent=1) + "\n")
    return truth


@torch.no_grad()
def routing_agreement(model, tokenizer) -> float:
    """Share of planted (layer, relation) last-position choices the model's own router makes (top-2 = planted)."""
    from nnsight_moe.recipes.prompts import encode_prompts, last_positions

    truth = ground_truth()
    agree, total = 0, 0
    for rel in relations():
        prompts = [f.prompt for f in rel.facts()]
        batch = encode_prompts(tokenizer, prompts, "cpu")
        last = last_positions(batch["attention_mask"])
        out = model(**batch, output_router_logits=True)
        for layer in truth["planted_layers"]:
            logits = out.router_logits[layer].view(len(prompts), -1, EXPERTS)[torch.arange(len(prompts)), last]
            chosen = logits.topk(TOP_K, dim=-1).indices
            planted = {e for l, e in truth["experts"][rel.name] if l == layer}
            for row in chosen.tolist():
                agree += set(row) == planted
                total += 1
    return agree / total


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(prog="python -m nnsight_moe.demo.planted", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=FOLDER)
    parser.add_argument("--steps", type=int, default=TRAIN["steps"])
    args = parser.parse_args()
    info = train(args.out, args.steps)
    print(json.dumps({k: info[k] for k in ("training", "weights_bytes")}, indent=1))
