"""RMSNorm (Zhang & Sennrich 2019), as in LLaMA and every DeepSeek model.

    y = x / sqrt(mean(x^2) + eps) * g

No mean subtraction and no bias. Computed in fp32 whatever the activation dtype: the mean
of squares over thousands of channels loses too many bits in bf16 (V3 §3.3 keeps
normalisation in high precision). `g` starts at one (`init_constant`, read by model/init.py).

With a `region` set (train.recompute=selective with "norm"; model/recompute.py injects a
checkpointing runner) backward keeps only the norm's input and recomputes its fp32
intermediates (V3 §3.2.3 recomputes every RMSNorm). Its output is what the next projection keeps.
"""
from __future__ import annotations

import torch
from torch import nn

from ds_parallel.kernels import rsqrt


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.weight.init_constant = 1.0
        self.region = None  # how `_normalise` runs with grad: None directly, else region(fn, *args)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.region is not None and torch.is_grad_enabled():
            return self.region(self._normalise, x)
        return self._normalise(x)

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()  # (..., D)
        y = xf * rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)
