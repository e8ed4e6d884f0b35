"""Build small random HART folders in the official on-disk layout, for tests.

The layout mirrors what the official `save_pretrained` writes: `llm/config.json`
+ weights (the transformer state dict with its persistent buffers) and
`tokenizer/config.json` + weights under `vae.` (plus discriminator keys under
`disc.`, which loaders must ignore).
"""

from __future__ import annotations

import json
import os
from typing import Optional

import torch
from safetensors.torch import save_file

from hart_fast.config import TokenizerConfig, TransformerConfig
from hart_fast.model.tokenizer import HartTokenizer
from hart_fast.model.transformer import HartTransformer

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


def randomize_(module: torch.nn.Module, seed: int = 0) -> None:
    """Fan-in scaled random weights so activations stay O(1) (no zero tensors)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
            elif "norm" in name or "ln" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))


def llm_state(cfg: TransformerConfig, Cvae: int, V: int, seed: int = 0):
    model = HartTransformer(cfg, Cvae, V)
    randomize_(model, seed)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    n = cfg.total_tokens
    lvl = sd["lvl_1L"].view(-1)
    sd["attn_bias_for_masking"] = torch.where(
        lvl.view(-1, 1) >= lvl.view(1, -1), 0.0, -torch.inf
    ).view(1, 1, n, n)
    return sd


def tok_state(cfg: TokenizerConfig, with_encoder: bool = True, seed: int = 1):
    model = HartTokenizer(cfg, with_encoder=with_encoder)
    randomize_(model, seed)
    sd = {"vae." + k: v.contiguous() for k, v in model.state_dict().items()}
    sd["vae.quantize.ema_vocab_hit_SV"] = torch.zeros(len(cfg.v_patch_nums), cfg.vocab_size)
    sd["disc.some.conv.weight"] = torch.randn(4, 3, 3, 3)  # the discriminator: ignored by loaders
    return sd


def write_model(root: str, llm_overrides: Optional[dict] = None, tok_overrides: Optional[dict] = None,
                with_encoder: bool = True, seed: int = 0, llm_format: str = "safetensors") -> str:
    """Write a complete random model folder under `root` and return its path."""
    llm_cfg_d = {**TINY_LLM, **(llm_overrides or {}), "model_type": "hart_transformer_t2i",
                 "architectures": ["HARTForT2I"]}
    tok_cfg_d = {**TINY_TOK, **(tok_overrides or {}), "model_type": "hart_autoencoder_with_disc",
                 "architectures": ["HARTAutoEncoderWithDisc"]}
    tcfg = TransformerConfig.from_dict(dict(llm_cfg_d))
    kcfg = TokenizerConfig.from_dict(dict(tok_cfg_d))
    os.makedirs(os.path.join(root, "llm"), exist_ok=True)
    os.makedirs(os.path.join(root, "tokenizer"), exist_ok=True)
    with open(os.path.join(root, "llm", "config.json"), "w") as f:
        json.dump(llm_cfg_d, f, indent=2)
    with open(os.path.join(root, "tokenizer", "config.json"), "w") as f:
        json.dump(tok_cfg_d, f, indent=2)
    sd = llm_state(tcfg, kcfg.Cvae, kcfg.vocab_size, seed)
    if llm_format == "safetensors":
        save_file(sd, os.path.join(root, "llm", "model.safetensors"))
    elif llm_format == "bin":
        torch.save(sd, os.path.join(root, "llm", "pytorch_model.bin"))
    elif llm_format == "sharded":
        keys = sorted(sd)
        half = len(keys) // 2
        shards = {"model-00001-of-00002.safetensors": keys[:half], "model-00002-of-00002.safetensors": keys[half:]}
        weight_map = {}
        for name, ks in shards.items():
            save_file({k: sd[k] for k in ks}, os.path.join(root, "llm", name))
            weight_map.update({k: name for k in ks})
        with open(os.path.join(root, "llm", "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f)
    else:
        raise ValueError(llm_format)
    save_file(tok_state(kcfg, with_encoder, seed + 1), os.path.join(root, "tokenizer", "model.safetensors"))
    return root


def random_prompts(B: int, T: int, D: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    context = torch.randn(B, T, D, generator=g)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    return context, mask
