"""Typed configs for the two official HART folders (``llm/`` and ``tokenizer/``).

Every key the official config classes accept is listed here and is either used by
inference, known to matter only for training (accepted, and has no effect at
inference), or refused with an error that names the key and the file. A key the
official classes do not know is an error too: a silently ignored key is how a
"faithful" reimplementation drifts.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Tuple


class ConfigError(ValueError):
    """A config.json that hart_fast cannot run faithfully."""


# Keys that `transformers.PretrainedConfig.save_pretrained` writes into every
# config.json. They describe the file, not the model.
_HF_METADATA_KEYS = frozenset(
    {
        "architectures",
        "dtype",
        "torch_dtype",
        "transformers_version",
        "model_type",
        "_name_or_path",
        "_commit_hash",
        "_attn_implementation_autoset",
        "auto_map",
        "return_dict",
        "output_hidden_states",
        "output_attentions",
        "torchscript",
        "use_bfloat16",
        "tf_legacy_loss",
        "pruned_heads",
        "tie_word_embeddings",
        "chunk_size_feed_forward",
        "is_encoder_decoder",
        "is_decoder",
        "cross_attention_hidden_size",
        "add_cross_attention",
        "tie_encoder_decoder",
        "id2label",
        "label2id",
        "problem_type",
        "tokenizer_class",
        "prefix",
        "bos_token_id",
        "pad_token_id",
        "eos_token_id",
        "sep_token_id",
        "decoder_start_token_id",
        "task_specific_params",
        "finetuning_task",
        "num_labels",
    }
)


def _read_json(path: str) -> Dict[str, Any]:
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path, "r", encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object, found {type(data).__name__}")
    return data


def _check_type(path, key, value, types, what):
    # bool is an int subclass; a config that says `"depth": true` is a mistake.
    if isinstance(value, bool) and bool not in types:
        raise ConfigError(f"{path}: '{key}' must be {what}, got {value!r}")
    if not isinstance(value, types):
        raise ConfigError(f"{path}: '{key}' must be {what}, got {value!r}")


def _build(cls, data: Dict[str, Any], path: str, expected_model_type: str):
    model_type = data.get("model_type")
    if model_type is not None and model_type != expected_model_type:
        raise ConfigError(
            f"{path}: model_type is {model_type!r}, expected {expected_model_type!r}"
        )
    known = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        if key in _HF_METADATA_KEYS:
            continue
        if key not in known:
            raise ConfigError(
                f"{path}: unknown config key '{key}' (not a key of the official "
                f"{cls.__name__} config); refusing to guess what it means"
            )
        kwargs[key] = value
    obj = cls(**kwargs)
    obj.validate(path)
    return obj


@dataclass
class TransformerConfig:
    """`llm/config.json` (official `HARTForT2IConfig`, model_type hart_transformer_t2i)."""

    vae_path: Any = None
    context_token: int = 77
    context_dim: int = 768
    depth: int = 16
    embed_dim: int = 1024
    num_heads: int = 16
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    shared_aln: bool = False
    attn_l2_norm: bool = False
    patch_nums: Tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    mlp_type: str = "gpt2"
    attn_type: str = "gpt2"
    disable_aln: bool = False
    use_timestep_embed: bool = False
    sep_aln_pooling_mode: str = "max"
    use_cross_attn: bool = False
    diff_width: int = 1024
    diff_depth: int = 6
    num_sampling_steps: Any = "8"
    sampler: str = "iddpm"
    use_context_norm: bool = False
    # The official RMSNorm ignores this (its weight starts at ones and is loaded).
    context_norm_scale: float = 1.0
    # Training-only keys: dropout, stochastic depth, condition dropout, diffusion
    # batch multiplier, kernel-selection flags. None changes an inference result.
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    cond_drop_rate: float = 0.1
    diffusion_batch_mul: int = 4
    diffusion_head_repeats: int = 1
    flash_if_available: bool = True
    fused_if_available: bool = True

    TRAINING_ONLY = (
        "drop_rate",
        "attn_drop_rate",
        "drop_path_rate",
        "cond_drop_rate",
        "diffusion_batch_mul",
        "diffusion_head_repeats",
        "flash_if_available",
        "fused_if_available",
        "context_norm_scale",
    )

    def validate(self, path: str = "config.json") -> None:
        ints = ("context_token", "context_dim", "depth", "embed_dim", "num_heads",
                "diff_width", "diff_depth")
        for key in ints:
            _check_type(path, key, getattr(self, key), (int,), "a positive integer")
            if getattr(self, key) <= 0:
                raise ConfigError(f"{path}: '{key}' must be positive, got {getattr(self, key)}")
        for key in ("shared_aln", "attn_l2_norm", "disable_aln", "use_timestep_embed",
                    "use_cross_attn", "use_context_norm"):
            _check_type(path, key, getattr(self, key), (bool,), "true or false")
        _check_type(path, "mlp_ratio", self.mlp_ratio, (int, float), "a number")
        _check_type(path, "norm_eps", self.norm_eps, (int, float), "a number")
        if not isinstance(self.patch_nums, (list, tuple)) or len(self.patch_nums) < 2 or not all(
            isinstance(p, int) and not isinstance(p, bool) and p > 0 for p in self.patch_nums
        ):
            raise ConfigError(
                f"{path}: 'patch_nums' must be a list of at least two positive integers, "
                f"got {self.patch_nums!r}"
            )
        self.patch_nums = tuple(self.patch_nums)
        if list(self.patch_nums) != sorted(self.patch_nums):
            raise ConfigError(f"{path}: 'patch_nums' must be increasing, got {self.patch_nums}")
        if self.embed_dim % self.num_heads:
            raise ConfigError(
                f"{path}: embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}"
            )
        if self.attn_type != "llama":
            if self.attn_type == "gpt2":
                raise ConfigError(
                    f"{path}: attn_type 'gpt2' is not supported: the official HART "
                    "inference path cannot run it (it needs context position handling "
                    "that only the 'llama' attention has); use attn_type 'llama'"
                )
            raise ConfigError(f"{path}: unsupported attn_type {self.attn_type!r} (supported: 'llama')")
        if (self.head_dim % 4) != 0:
            raise ConfigError(
                f"{path}: head_dim {self.head_dim} must be a multiple of 4 for the 2-D RoPE"
            )
        if self.mlp_type not in ("gpt2", "llama"):
            raise ConfigError(f"{path}: unsupported mlp_type {self.mlp_type!r} (supported: 'gpt2', 'llama')")
        if self.sep_aln_pooling_mode not in ("max", "avg"):
            raise ConfigError(
                f"{path}: unsupported sep_aln_pooling_mode {self.sep_aln_pooling_mode!r} "
                "(supported: 'max', 'avg')"
            )
        if self.use_cross_attn:
            raise ConfigError(
                f"{path}: use_cross_attn=true is not supported: the official cross-attention "
                "path needs xformers and attends across the whole batch; no released HART "
                "checkpoint uses it"
            )
        if self.sampler != "iddpm":
            raise ConfigError(f"{path}: unsupported sampler {self.sampler!r} (supported: 'iddpm')")
        self.num_sampling_steps = str(self.num_sampling_steps)
        from hart_fast.model.diffusion import space_timesteps  # validation of the string

        try:
            space_timesteps(1000, self.num_sampling_steps)
        except ValueError as e:
            raise ConfigError(f"{path}: invalid num_sampling_steps {self.num_sampling_steps!r}: {e}") from e

    # Derived sizes -----------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def num_stages(self) -> int:
        return len(self.patch_nums)

    @property
    def ffn_hidden(self) -> int:
        if self.mlp_type == "gpt2":
            return round(self.embed_dim * self.mlp_ratio)
        # SwiGLU: 2/3 of the gpt2 width, rounded up to a multiple of 256.
        return int((self.embed_dim * self.mlp_ratio * 2) / 3 + 255) // 256 * 256

    @property
    def image_tokens(self) -> int:
        return sum(p * p for p in self.patch_nums[1:])

    @property
    def total_tokens(self) -> int:
        """Context tokens plus every image token after stage 0 (the KV-cache length)."""
        return self.context_token + self.image_tokens

    @classmethod
    def from_dict(cls, data: Dict[str, Any], path: str = "config.json") -> "TransformerConfig":
        return _build(cls, data, path, "hart_transformer_t2i")

    @classmethod
    def from_file(cls, path: str) -> "TransformerConfig":
        return cls.from_dict(_read_json(path), path)

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["patch_nums"] = list(self.patch_nums)
        d["model_type"] = "hart_transformer_t2i"
        return d


@dataclass
class TokenizerConfig:
    """`tokenizer/config.json` (official `HARTAutoEncoderWithDiscConfig`)."""

    vocab_size: int = 4096
    z_channels: int = 32
    ch: int = 160
    ch_mult: Tuple[int, ...] = (1, 1, 2, 2, 4)
    quant_conv_ks: int = 3
    quant_resi: float = 0.5
    share_quant_resi: int = 4
    default_qresi_counts: int = 0
    v_patch_nums: Tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    using_znorm: bool = False
    quantizer_type: str = "var"
    double_decoder: bool = False
    # Training-only keys (loss weights, FSQ levels of an unused quantizer,
    # freezing flags, dropout which is a no-op in eval).
    dropout: float = 0.0
    beta: float = 0.25
    test_mode: bool = False
    levels: Any = field(default_factory=lambda: [8, 8, 8, 6, 5])
    hybrid: bool = False
    disable_quant_resi: bool = False
    freeze_codebook_for_hybrid: bool = True

    TRAINING_ONLY = ("dropout", "beta", "test_mode", "levels", "hybrid",
                     "disable_quant_resi", "freeze_codebook_for_hybrid")

    def validate(self, path: str = "config.json") -> None:
        for key in ("vocab_size", "z_channels", "ch", "quant_conv_ks"):
            _check_type(path, key, getattr(self, key), (int,), "a positive integer")
            if getattr(self, key) <= 0:
                raise ConfigError(f"{path}: '{key}' must be positive, got {getattr(self, key)}")
        if self.quant_conv_ks % 2 != 1:
            raise ConfigError(f"{path}: quant_conv_ks must be odd, got {self.quant_conv_ks}")
        if not isinstance(self.ch_mult, (list, tuple)) or not self.ch_mult or not all(
            isinstance(m, int) and not isinstance(m, bool) and m > 0 for m in self.ch_mult
        ):
            raise ConfigError(f"{path}: 'ch_mult' must be a list of positive integers, got {self.ch_mult!r}")
        self.ch_mult = tuple(self.ch_mult)
        for c in (self.ch * m for m in self.ch_mult):
            if c % 32:
                raise ConfigError(
                    f"{path}: decoder width {c} (ch x ch_mult) is not divisible by the 32 GroupNorm groups"
                )
        if not isinstance(self.v_patch_nums, (list, tuple)) or not self.v_patch_nums:
            raise ConfigError(f"{path}: 'v_patch_nums' must be a list of integers")
        self.v_patch_nums = tuple(self.v_patch_nums)
        if self.quantizer_type not in ("var", "var_hybrid"):
            raise ConfigError(
                f"{path}: unsupported quantizer_type {self.quantizer_type!r} (supported: 'var_hybrid', 'var')"
            )
        _check_type(path, "quant_resi", self.quant_resi, (int, float), "a number")
        _check_type(path, "share_quant_resi", self.share_quant_resi, (int,), "an integer >= 0")
        if self.share_quant_resi < 0:
            raise ConfigError(f"{path}: share_quant_resi must be >= 0, got {self.share_quant_resi}")
        _check_type(path, "using_znorm", self.using_znorm, (bool,), "true or false")

    @property
    def Cvae(self) -> int:
        return self.z_channels

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def num_phi(self) -> int:
        """How many phi convs the quantizer holds (0 when quant_resi is ~0: identity)."""
        if abs(self.quant_resi) <= 1e-6:
            return 0
        if self.share_quant_resi == 0:
            return self.default_qresi_counts or len(self.v_patch_nums)
        if self.share_quant_resi == 1:
            return 1
        return self.share_quant_resi

    @classmethod
    def from_dict(cls, data: Dict[str, Any], path: str = "config.json") -> "TokenizerConfig":
        model_type = data.get("model_type", "hart_autoencoder_with_disc")
        if model_type not in ("hart_autoencoder_with_disc", "hart_autoencoder"):
            raise ConfigError(
                f"{path}: model_type is {model_type!r}, expected 'hart_autoencoder_with_disc'"
            )
        return _build(cls, data, path, model_type)

    @classmethod
    def from_file(cls, path: str) -> "TokenizerConfig":
        return cls.from_dict(_read_json(path), path)

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["ch_mult"] = list(self.ch_mult)
        d["v_patch_nums"] = list(self.v_patch_nums)
        d["model_type"] = "hart_autoencoder_with_disc"
        return d


def phi_ticks(k: int):
    """Tick positions in [0, 1] of k partially shared phi convs (official rule)."""
    import numpy as np

    if k == 4:
        return np.linspace(1 / 3 / k, 1 - 1 / 3 / k, k)
    return np.linspace(1 / 2 / k, 1 - 1 / 2 / k, k)


def phi_index(cfg: TokenizerConfig, si: int, num_stages: int) -> int:
    """Which phi conv stage `si` of `num_stages` uses (nearest tick of si/(S-1))."""
    import numpy as np

    k = cfg.num_phi
    if cfg.share_quant_resi == 1 or k <= 1:
        return 0
    at = si / (num_stages - 1)
    return int(np.argmin(np.abs(phi_ticks(k) - at)))


__all__ = ["ConfigError", "TransformerConfig", "TokenizerConfig", "phi_index", "phi_ticks"]
