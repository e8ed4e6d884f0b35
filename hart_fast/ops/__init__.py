"""Fused kernels of hart_fast with pure-PyTorch references.

Every op comes as a pair:

* ``<op>(...)`` validates its arguments (``TypeError`` / ``ValueError`` naming
  the argument, its shape, dtype and device) and calls the compiled kernel
  ``torch.ops.hart_fast.<op>``;
* ``<op>_reference(...)`` is the plain PyTorch definition of the semantics
  (the official HART code path).  It is the ground truth of the tests and the
  fallback used when the compiled extension is unavailable.

``HAS_EXTENSION`` says whether ``hart_fast._C`` was importable;
``HAS_CUDA_KERNELS`` whether it was built with its CUDA kernels.  The wrappers
read these module attributes at call time, so tests can monkeypatch them to
exercise the fallback path.
"""

from __future__ import annotations

import torch  # noqa: F401  (loads libtorch, which hart_fast._C links against)

try:
    from hart_fast import _C  # noqa: F401  (loading it registers torch.ops.hart_fast.*)
except ImportError as _err:  # not built, or built against another torch
    HAS_EXTENSION = False
    HAS_CUDA_KERNELS = False
    EXTENSION_IMPORT_ERROR: ImportError | None = _err
else:
    HAS_EXTENSION = True
    HAS_CUDA_KERNELS = bool(getattr(_C, "CUDA_ENABLED", 0))
    EXTENSION_IMPORT_ERROR = None
    from hart_fast.ops import _meta  # noqa: F401  (fake kernels for torch.compile)

# One module per op family; each pairs the op with its `_reference`.
from hart_fast.ops.norm import (  # noqa: E402
    add_layer_norm_modulate,
    add_layer_norm_modulate_reference,
    add_rms_norm_modulate,
    add_rms_norm_modulate_reference,
    layer_norm_modulate,
    layer_norm_modulate_reference,
    rms_norm_modulate,
    rms_norm_modulate_reference,
)
from hart_fast.ops.vq import vq_nearest_code, vq_nearest_code_reference  # noqa: E402
from hart_fast.ops.vq_glue import (  # noqa: E402
    area_downsample,
    area_downsample_reference,
    bicubic_upsample,
    bicubic_upsample_reference,
    latent_to_tokens_fast,
    next_scale_input_fast,
    phi_blend_accumulate_,
    phi_blend_accumulate_reference_,
)
from hart_fast.ops.attention import (  # noqa: E402
    attention,
    ms_attention,
    ms_attention_block_causal,
    ms_attention_block_causal_reference,
    ms_attention_reference,
    qkv_rope_cache,
    qkv_rope_cache_reference,
)
from hart_fast.ops.sampling import cfg_top_k_filter, cfg_top_k_filter_reference  # noqa: E402
from hart_fast.ops.diffusion import iddpm_step_fused, iddpm_step_fused_reference, schedule_scalars  # noqa: E402
from hart_fast.ops.group_norm import group_norm_silu, group_norm_silu_reference  # noqa: E402

__all__ = [
    "HAS_CUDA_KERNELS",
    "HAS_EXTENSION",
    "EXTENSION_IMPORT_ERROR",
    # norms
    "add_layer_norm_modulate",
    "add_layer_norm_modulate_reference",
    "add_rms_norm_modulate",
    "add_rms_norm_modulate_reference",
    "layer_norm_modulate",
    "layer_norm_modulate_reference",
    "rms_norm_modulate",
    "rms_norm_modulate_reference",
    # vector quantisation and the glue between scales
    "vq_nearest_code",
    "vq_nearest_code_reference",
    "area_downsample",
    "area_downsample_reference",
    "bicubic_upsample",
    "bicubic_upsample_reference",
    "phi_blend_accumulate_",
    "phi_blend_accumulate_reference_",
    "next_scale_input_fast",
    "latent_to_tokens_fast",
    # attention and the KV cache
    "attention",
    "ms_attention",
    "ms_attention_reference",
    "ms_attention_block_causal",
    "ms_attention_block_causal_reference",
    "qkv_rope_cache",
    "qkv_rope_cache_reference",
    # sampling
    "cfg_top_k_filter",
    "cfg_top_k_filter_reference",
    # residual diffusion
    "iddpm_step_fused",
    "iddpm_step_fused_reference",
    "schedule_scalars",
    # VAE
    "group_norm_silu",
    "group_norm_silu_reference",
]
