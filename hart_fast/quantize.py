"""Quantised weights, two speed levers: int8 on the CPU, fp8 on Hopper / Ada GPUs.

int8 (`Int8Linear`, the `int8_weights` lever): each linear's weight is
quantised once to int8, per output channel (symmetric, one scale per row); at
run time every call quantises its input per tensor (dynamic range) and runs
torch's int8 GEMM (fbgemm / oneDNN on x86, qnnpack elsewhere), with the bias
added in float32. Its speed and its error (that of 8-bit weights) are measured
per preset by bench/speed_modes.py.

fp8 (`Fp8Linear`, the `fp8_weights` lever): each weight once to float8 e4m3,
one scale per output channel (amax / 448); every call scales each input row by
its own amax (so a row's result never depends on the other rows of its batch),
runs `torch._scaled_mm` (fp8 tensor cores; float32 accumulation and output) and
applies the row and channel scales and the bias in float32. A projection whose
sizes the fp8 GEMM cannot take (in or out features not a multiple of 16) keeps
its float weight. `torch._scaled_mm` also runs on the CPU, which is how the tests
check the arithmetic on machines without such a GPU; the lever itself is refused
there (no speed to win).

Only the fast engine uses them (`FastEngine(weights="int8" | "fp8")`): the
transformer's qkv, output, FFN and head projections. The residual-diffusion
MLP, the embeddings and the decoder keep the pipeline's dtype.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn.functional as F


class Int8Linear:
    """y = x @ W^T + b with W held as per-channel int8 (a callable, not a module)."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor] = None):
        if weight.device.type != "cpu":
            raise ValueError(f"int8_weights runs on the CPU only (weights on {weight.device}); "
                             "on a GPU use dtype='float16' or 'bfloat16'")
        w = weight.detach().float()
        scales = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0
        with warnings.catch_warnings():  # torch marks its quantized tensors as deprecated; they still run
            warnings.simplefilter("ignore", UserWarning)
            qw = torch.quantize_per_channel(w, scales.double(), torch.zeros(w.shape[0], dtype=torch.int64), 0,
                                            torch.qint8)
            self.packed = torch.ops.quantized.linear_prepack(qw, None if bias is None else bias.detach().float())
        self.out_features, self.in_features = w.shape

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        # reduce_range: 7-bit activations, which x86's int8 GEMM (vpmaddubsw) needs to
        # not saturate its 16-bit pair sums (without it the error is 4x larger).
        y = torch.ops.quantized.linear_dynamic(x.reshape(-1, shape[-1]).float().contiguous(), self.packed, True)
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)


def int8_from(linear: torch.nn.Linear) -> Int8Linear:
    return Int8Linear(linear.weight, linear.bias)


FP8_MAX = 448.0  # the largest finite float8 e4m3fn value


def fp8_supported(device) -> bool:
    """Whether `device` has fp8 tensor cores (CUDA compute capability 8.9 or later)."""
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= (8, 9)


def fp8_quantize_rows(x_MK: torch.Tensor):
    """(M, K) float -> (float8 e4m3 (M, K), float32 scales (M,)): row m is x[m] / scale[m],
    scale[m] = amax(|x[m]|) / 448 (an all-zero row gets a tiny scale, not a division by 0)."""
    x = x_MK.float()
    scale = x.abs().amax(dim=1).clamp_min(1e-12) / FP8_MAX
    return (x / scale[:, None]).to(torch.float8_e4m3fn), scale


class Fp8Linear:
    """y = x @ W^T + b with W held as float8 e4m3 and one float32 scale per output
    channel; the input quantised per row at run time (a callable, not a module)."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor] = None):
        self.out_features, self.in_features = weight.shape
        self.bias = None if bias is None else bias.detach().float()
        # _scaled_mm takes only sizes that are multiples of 16; other projections keep
        # their float weight (none in HART's shapes).
        self.fallback = weight.detach() if (self.in_features % 16 or self.out_features % 16) else None
        if self.fallback is None:
            self.w_NK, self.w_scale_N = fp8_quantize_rows(weight.detach())
            # Unit scales for _scaled_mm, made once: a tensor made per call would be a
            # host-to-device copy inside the engine's CUDA graphs.
            self.one = torch.ones((), device=weight.device, dtype=torch.float32)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.fallback is not None:
            return F.linear(x, self.fallback.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        shape = x.shape
        x_q, x_scale_M = fp8_quantize_rows(x.reshape(-1, shape[-1]))
        # W^T as a column-major view: the layout the fp8 GEMM wants for its second operand.
        y = torch._scaled_mm(x_q, self.w_NK.t(), scale_a=self.one, scale_b=self.one, out_dtype=torch.float32)
        y = y.mul_(x_scale_M[:, None]).mul_(self.w_scale_N)
        if self.bias is not None:
            y = y.add_(self.bias)
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)


def fp8_from(linear: torch.nn.Linear) -> Fp8Linear:
    return Fp8Linear(linear.weight, linear.bias)


# The engine's quantised projections by lever: (class for a weight and bias, builder from an nn.Linear).
QUANTIZED = {"int8": (Int8Linear, int8_from), "fp8": (Fp8Linear, fp8_from)}


__all__ = ["FP8_MAX", "Fp8Linear", "Int8Linear", "QUANTIZED", "fp8_from", "fp8_quantize_rows", "fp8_supported",
           "int8_from"]
