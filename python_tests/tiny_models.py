"""Small random HART folders for tests, in the official on-disk layout (see hart_fast.demo)."""

from __future__ import annotations

import os

import torch

from hart_fast.demo import randomize_, write_model_folder

# The official implementation's recorded outputs (shared/ sits beside the checkout).
REFERENCE_DIR = os.environ.get(
    "HART_FAST_REFERENCE_DIR",
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "reference", "tiny_llama"),
)

TINY_LLM = dict(
    context_token=6, context_dim=24, depth=2, embed_dim=32, num_heads=2, mlp_ratio=4.0,
    patch_nums=[1, 2, 3, 4], attn_type="llama", mlp_type="gpt2", disable_aln=True,
    shared_aln=False, use_timestep_embed=True, sep_aln_pooling_mode="max",
    use_context_norm=True, diff_width=16, diff_depth=2, num_sampling_steps="4", vae_path=None,
)
TINY_TOK = dict(
    vocab_size=32, z_channels=4, ch=32, ch_mult=[1, 2], v_patch_nums=[1, 2, 3, 4],
    quantizer_type="var_hybrid", share_quant_resi=4, quant_resi=0.5,
)


def write_model(root, llm_overrides=None, tok_overrides=None, with_encoder=True, seed=0,
                llm_format="safetensors"):
    """A complete random tiny model folder under `root` (4x4 last grid, 8x8 images)."""
    return write_model_folder(root, {**TINY_LLM, **(llm_overrides or {})}, {**TINY_TOK, **(tok_overrides or {})},
                              with_encoder=with_encoder, seed=seed, llm_format=llm_format)


def random_prompts(B, T, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    context = torch.randn(B, T, D, generator=g)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    return context, mask


__all__ = ["TINY_LLM", "TINY_TOK", "REFERENCE_DIR", "write_model", "random_prompts", "randomize_"]
