"""Tiny demo models embedded in the package, trained on the bundled relations (offline use).

    from nnsight_moe import demo
    model, tokenizer = demo.load("demo-moe")     # Qwen2MoeForCausalLM: 8 routed experts (top-2) + shared expert
    dense, _ = demo.load("demo-dense")           # Qwen2-style dense LM (as LlamaForCausalLM), same depth/width
    moe8, _ = demo.load("faithful-moe")          # the faithful trio (nnsight_moe.demo.faithful): 8-layer MoE,
    dense8, _ = demo.load("faithful-dense")      #   8-layer dense,
    dense12, _ = demo.load("faithful-dense-12")  #   12-layer dense (the depth confound)

``demo-moe`` / ``demo-dense`` (4 layers, saturated: p(target) ~1) are the quick demo the tests and docs
use; the faithful trio is built to ask the study's questions (not saturated, a shared expert with a
general role, two dense depths; see :mod:`nnsight_moe.demo.faithful` and docs/recipes/faithful.md).

All share one word-level tokenizer (vocabulary = the words of :func:`nnsight_moe.data.bundled`), so
they only understand text made of those words; unknown words become ``[UNK]``. The tokenizer prepends
``[BOS]`` and pads on the LEFT, so ``model(**tokenizer(prompts, padding=True, return_tensors="pt"))
.logits[:, -1]`` are the next-token logits after each prompt. Retrain with
``python -m nnsight_moe.demo.train`` (see docs/data.md).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["DEFAULT_DENSE", "load", "load_tokenizer", "names", "path"]

_MODELS_DIR = Path(__file__).resolve().parent / "models"
_NAMES = ("demo-moe", "demo-dense", "faithful-moe", "faithful-dense", "faithful-dense-12")
#: the module that retrains each demo (named in the error when its files are missing)
_TRAINER = {"demo-moe": "nnsight_moe.demo.train", "demo-dense": "nnsight_moe.demo.train"}
#: dense models an MoE demo is compared with by default (``nnsight-moe run --model NAME``)
DEFAULT_DENSE = {"demo-moe": ("demo-dense",), "faithful-moe": ("faithful-dense", "faithful-dense-12")}
#: The files of a demo folder: a plain Hugging Face model folder (AutoTokenizer, AutoModelForCausalLM,
#: TransformerBridge.boot_transformers and nnsight load it by path; metrics.json is the training record).
FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def names() -> list[str]:
    """Names of the embedded demo models: ``["demo-moe", "demo-dense", "faithful-moe", "faithful-dense",
    "faithful-dense-12"]``."""
    return list(_NAMES)


def path(name: str = "demo-moe") -> Path:
    """Directory of a demo model: a Hugging Face model folder (:data:`FILES`, plus metrics.json).

    ``AutoTokenizer.from_pretrained(path(name))`` and ``AutoModelForCausalLM.from_pretrained(path(name))``
    give the same tokenizer and model as :func:`load`; so do ``TransformerBridge.boot_transformers`` and
    nnsight's ``TransformersModel`` given the path, and ``nnsight-moe run --model`` on a copy of it.

    Unknown names raise a ValueError listing the available ones; a known model whose files are
    missing raises FileNotFoundError telling how to rebuild them.
    """
    if name not in _NAMES:
        raise ValueError(f"unknown demo model {name!r}; available: {', '.join(_NAMES)}")
    folder = _MODELS_DIR / name
    missing = [f for f in FILES if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"demo model {name!r} is missing {missing} in {folder}; rebuild with "
            f"`python -m {_TRAINER.get(name, 'nnsight_moe.demo.faithful')}`"
        )
    return folder


def load_tokenizer(name: str = "demo-moe"):
    """The demo tokenizer as a ``transformers.PreTrainedTokenizerFast`` (pad/unk/bos/eos set, left padding)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_file=str(path(name) / "tokenizer.json"),
        bos_token="[BOS]",
        eos_token="[EOS]",
        unk_token="[UNK]",
        pad_token="[PAD]",
        padding_side="left",
        model_max_length=128,
    )


def load(name: str = "demo-moe", *, dtype=None, device=None):
    """Load a demo model and its tokenizer from the package files only (no network): ``(model, tokenizer)``.

    ``name``: ``"demo-moe"`` / ``"faithful-moe"`` (``Qwen2MoeForCausalLM``) or ``"demo-dense"`` /
    ``"faithful-dense"`` / ``"faithful-dense-12"`` (``LlamaForCausalLM``: Qwen2's dense architecture,
    o_proj bias 0); other names raise a ValueError listing these. ``dtype`` (default float32, as stored) and ``device``
    (default CPU) are applied to the model, which is returned in eval mode. The tokenizer is a
    ``PreTrainedTokenizerFast`` with ``padding_side="left"`` (last position = last prompt token) that
    prepends ``[BOS]``. torch is set to 1 CPU thread unless a count was chosen (``NNSIGHT_MOE_THREADS``,
    ``OMP_NUM_THREADS``): see :mod:`nnsight_moe.threads`.
    """
    import torch

    from nnsight_moe import threads
    from transformers import AutoModelForCausalLM

    folder = path(name)
    model = AutoModelForCausalLM.from_pretrained(
        folder, local_files_only=True, dtype=dtype if dtype is not None else torch.float32
    )
    if device is not None:
        model = model.to(device)
    model.eval()
    threads.configure(model=model)
    return model, load_tokenizer(name)
