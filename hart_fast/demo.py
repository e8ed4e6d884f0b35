"""Writing HART folders in the official on-disk layout, with seeded random weights.

Used by the tests and benchmarks (random models of any shape), by the training
code (`llm_state_dict` / `tokenizer_state_dict`, `write_text_encoder`), and for
the previous embedded default (`build_random_demo`, the chance baseline of the
quality benchmark). The layout is what the official `save_pretrained` writes: `llm/config.json`
+ weights (the transformer state dict with its persistent buffers) and
`tokenizer/config.json` + weights under `vae.` (discriminator keys under `disc.`
are ignored by loaders). The demo model also carries `text_encoder/`, a tiny
Qwen2 LLM with a byte-level tokenizer, so `hart_fast.generate("...")` works
right after install.

The embedded default model (`hart_fast/assets/hart-demo`) is trained: it is written
by `hart_fast.train.recipe`, not here.
"""

from __future__ import annotations

import json
import os
from typing import Optional, Sequence

import torch

from hart_fast.config import TokenizerConfig, TransformerConfig

DEMO_NAME = "hart-demo (a small HART trained on procedural scenes, not the HART 0.7B model)"
DEMO_DIR = os.path.join(os.path.dirname(__file__), "assets", "hart-demo")

# The previous embedded default's shape (now the random baseline, build_random_demo).
DEMO_LLM = dict(
    context_token=32, context_dim=64, depth=2, embed_dim=64, num_heads=4, mlp_ratio=4.0,
    patch_nums=[1, 2, 3, 4, 6, 8], attn_type="llama", mlp_type="gpt2", disable_aln=True,
    shared_aln=False, use_timestep_embed=True, sep_aln_pooling_mode="max", use_context_norm=True,
    diff_width=64, diff_depth=2, num_sampling_steps="8", vae_path=None,
)
DEMO_TOK = dict(
    vocab_size=256, z_channels=8, ch=32, ch_mult=[1, 1, 2, 2], v_patch_nums=[1, 2, 3, 4, 6, 8],
    quantizer_type="var_hybrid", share_quant_resi=4, quant_resi=0.5,
)


def randomize_(module: torch.nn.Module, seed: int = 0) -> None:
    """Fan-in scaled normal weights (norm weights near 1, small biases), seeded."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
            elif "norm" in name or "ln" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))


def llm_state_dict(model: torch.nn.Module) -> dict:
    """The transformer's state dict as the official `llm/` weights hold it."""
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    lvl = sd["lvl_1L"].view(-1)
    n = lvl.numel()
    # The official training mask buffer: a token sees its own and earlier levels.
    sd["attn_bias_for_masking"] = torch.where(lvl.view(-1, 1) >= lvl.view(1, -1), 0.0, -torch.inf).view(1, 1, n, n)
    return sd


def tokenizer_state_dict(model: torch.nn.Module) -> dict:
    """The tokenizer's state dict as the official `tokenizer/` weights hold it (under `vae.`)."""
    cfg = model.cfg
    sd = {"vae." + k: v.detach().contiguous() for k, v in model.state_dict().items()}
    sd["vae.quantize.ema_vocab_hit_SV"] = torch.zeros(len(cfg.v_patch_nums), cfg.vocab_size)
    sd["disc.head.weight"] = torch.zeros(1, 4)  # a discriminator key, as official files carry
    return sd


def _llm_state(cfg: TransformerConfig, Cvae: int, V: int, seed: int):
    from hart_fast.model.transformer import HartTransformer

    model = HartTransformer(cfg, Cvae, V)
    randomize_(model, seed)
    return llm_state_dict(model)


def _tok_state(cfg: TokenizerConfig, with_encoder: bool, seed: int):
    from hart_fast.model.tokenizer import HartTokenizer

    model = HartTokenizer(cfg, with_encoder=with_encoder)
    randomize_(model, seed)
    return tokenizer_state_dict(model)


def write_model_folder(root: str, llm: dict, tok: dict, with_encoder: bool = True, seed: int = 0,
                       llm_format: str = "safetensors", store_dtype: torch.dtype = torch.float32) -> str:
    """Write `root/llm` and `root/tokenizer` with random weights; returns root.

    `store_dtype` is the dtype of the floating-point tensors in the files (official
    checkpoints also ship in half precision); loaders upcast into the model's dtype.
    """

    def cast(sd):
        return {k: (v.to(store_dtype) if v.is_floating_point() and v.isfinite().all() else v) for k, v in sd.items()}

    from safetensors.torch import save_file

    llm_d = {**llm, "model_type": "hart_transformer_t2i", "architectures": ["HARTForT2I"]}
    tok_d = {**tok, "model_type": "hart_autoencoder_with_disc", "architectures": ["HARTAutoEncoderWithDisc"]}
    tcfg, kcfg = TransformerConfig.from_dict(dict(llm_d)), TokenizerConfig.from_dict(dict(tok_d))
    for sub, d in (("llm", llm_d), ("tokenizer", tok_d)):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
        with open(os.path.join(root, sub, "config.json"), "w") as f:
            json.dump(d, f, indent=2, sort_keys=True)
    sd = cast(_llm_state(tcfg, kcfg.Cvae, kcfg.vocab_size, seed))
    llm_dir = os.path.join(root, "llm")
    if llm_format == "safetensors":
        save_file(sd, os.path.join(llm_dir, "model.safetensors"))
    elif llm_format == "bin":
        torch.save(sd, os.path.join(llm_dir, "pytorch_model.bin"))
    elif llm_format == "sharded":
        keys = sorted(sd)
        shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
                  "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
        for name, ks in shards.items():
            save_file({k: sd[k] for k in ks}, os.path.join(llm_dir, name))
        with open(os.path.join(llm_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": {k: n for n, ks in shards.items() for k in ks}}, f)
    else:
        raise ValueError(f"unknown llm_format {llm_format!r}")
    save_file(cast(_tok_state(kcfg, with_encoder, seed + 1)), os.path.join(root, "tokenizer", "model.safetensors"))
    return root


def _bytes_to_unicode():
    """GPT-2's reversible byte -> printable-unicode table (the byte-level BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def _word_bpe(words: Sequence[str]):
    """A byte-level BPE (vocab, merges) in which every word of `words` is one token,
    with and without its leading space (any other text falls back to bytes)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    words = sorted(set(words))
    # Each word alone and after a space, as often as any other: the merges build every word whole.
    corpus = [w for w in words] + [f"x {w}" for w in words]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=100000, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(corpus, trainer)
    model = json.loads(tk.to_str())["model"]
    merges = [tuple(m) if isinstance(m, (list, tuple)) else tuple(m.split(" ")) for m in model["merges"]]
    base = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(base)}
    for tokstr in sorted(model["vocab"], key=model["vocab"].get):
        if tokstr not in vocab:
            vocab[tokstr] = len(vocab)
    return vocab, merges


def word_tokenizer(words: Optional[Sequence[str]] = None):
    """A byte-level Qwen2 tokenizer (<|endoftext|> as pad) whose BPE merges make each
    of `words` a single token (bytes only without them)."""
    from transformers import Qwen2Tokenizer

    if words:
        vocab, merges = _word_bpe(words)
    else:
        vocab, merges = {c: i for i, c in enumerate(_bytes_to_unicode().values())}, []
    vocab["<|endoftext|>"] = len(vocab)
    return Qwen2Tokenizer(vocab=vocab, merges=merges, pad_token="<|endoftext|>", eos_token="<|endoftext|>",
                          unk_token=None)


def write_text_encoder(path: str, hidden_size: int, seed: int = 0, num_layers: int = 2,
                       words: Optional[Sequence[str]] = None) -> str:
    """A tiny Qwen2 LLM with a byte-level Qwen2 tokenizer (<|endoftext|> as pad).

    Without `words` the tokenizer is bytes only; with them it also has BPE merges
    that make each of those words a single token (a short context then holds a
    whole caption).
    """
    from transformers import Qwen2Config, Qwen2Model
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tok = word_tokenizer(words)
    vocab = tok.get_vocab()
    heads = max(1, hidden_size // 16)
    cfg = Qwen2Config(vocab_size=len(vocab), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                      num_hidden_layers=num_layers, num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = Qwen2Model(cfg)
    randomize_(model, seed)
    os.makedirs(path, exist_ok=True)
    tok.save_pretrained(path)
    model.save_pretrained(path)
    return path


def build_random_demo(root: str) -> str:
    """The previous embedded default: the demo's old shape with seeded random weights
    (its images are structured noise). Deterministic for a given torch version."""
    write_model_folder(root, DEMO_LLM, DEMO_TOK, with_encoder=False, seed=2024, store_dtype=torch.float16)
    write_text_encoder(os.path.join(root, "text_encoder"), DEMO_LLM["context_dim"], seed=2025)
    return root
