"""int8 weights on the CPU, a speed lever: dynamically quantised linears.

Each linear's weight is quantised once to int8, per output channel (symmetric,
one scale per row); at run time every call quantises its input per tensor
(dynamic range) and runs torch's int8 GEMM (fbgemm / oneDNN on x86, qnnpack
elsewhere), with the bias added in float32. On the 2-core development machine
such a GEMM is several times faster than the float32 one; the error is that of
8-bit weights (measured per preset by bench/speed_modes.py).

Only the fast engine uses it (`FastEngine(int8_weights=True)`): the transformer's
qkv, output, FFN and head projections. The residual-diffusion MLP, the
embeddings and the decoder stay float32.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch


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


__all__ = ["Int8Linear", "int8_from"]
