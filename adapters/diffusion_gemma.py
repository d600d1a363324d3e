"""DiffusionGemma: Gemma-4's MoE layers (softmax, top-k, renormalised, times a per-expert scale; router and experts on the decoder layer) in two stacks, a prompt encoder and a block-diffusion canvas decoder.

``DiffusionGemmaForBlockDiffusion`` encodes the prompt (``input_ids``) with an autoregressive encoder
(``model.encoder.language_model.layers``) into a KV cache, then runs a bidirectional decoder
(``model.decoder.layers``) over a *canvas* (``decoder_input_ids``) that reads that cache; the logits are the
decoder's, one per canvas position. Every layer of both stacks is a Gemma-4 MoE layer (see
:mod:`nnsight_moe.adapters.gemma4`: the decoder layer is the block, ``hook_moe_out`` is the experts' output
before ``post_feedforward_layernorm_2``). The layout numbers the encoder's layers ``0 .. n-1`` and the
decoder's ``n .. 2n-1`` (execution order); the hook points say their stack:
``model.encoder.language_model.layers.L.hook_*`` and ``model.decoder.layers.L.hook_*``. The released
checkpoints tie the two stacks' weights, so zeroing an expert's weights acts on both stacks: block layout
layers ``L`` and ``n + L`` for that. Without ``decoder_input_ids`` the model draws a random canvas
(``torch.randint``); pass one for reproducible forwards. The recipes refuse the family (``Adapter.recipes``):
LPI, MRR / HIT@10 and their prompt positions have no meaning for a non-causal canvas decoder.
"""

from nnsight_moe.adapters.base import Adapter
from nnsight_moe.adapters.gemma4 import gemma4_routing

DIFFUSION_GEMMA = Adapter(
    name="diffusion_gemma",
    model_types=("diffusion_gemma", "diffusion_gemma_text"),
    routing=gemma4_routing,
    router="router",
    router_logits="proj",
    moe_out="experts",
    stacks=("model.encoder.language_model.layers", "model.decoder.layers"),
    recipes=("its logits are a bidirectional block-diffusion decoder's, one per position of a canvas "
             "(decoder_input_ids), not next-token predictions over the prompt, so the recipes' targets (the token "
             "after each prompt's last position: LPI attribution, MRR / HIT@10 of blocked experts, steering "
             "success) and their prompt masks and positions have no meaning for it; only the encoder stack "
             "sees the prompt. Read and edit the hook points of both stacks directly (nnsight_moe.attach, "
             "block_experts, nnsight_moe.steering)"),
)
