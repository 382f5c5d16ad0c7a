"""Rotary position embedding, with DeepSeek's YaRN extension.

RoPE rotates pairs of channels by position-dependent angles. DeepSeek rotates
*interleaved* pairs (2i, 2i+1) as complex numbers (GPT-J layout; HF `rope_interleave`),
LLaMA/HF-LLaMA rotate split halves (i, i + d/2). Both layouts are here; a model picks one
and stays with it.

YaRN (V3 §4.3; DeepSeek-V3 inference/model.py `precompute_freqs_cis`): with factor s > 1,
low-frequency channels are divided by s, high-frequency ones kept, and a linear ramp between the channels that turn
`beta_slow` and `beta_fast` times over the original context:

    corr_dim(r) = d * ln(L0 / (2*pi*r)) / (2 * ln base)
    low, high   = floor(corr_dim(beta_fast)), ceil(corr_dim(beta_slow))   (clamped)
    smooth_i    = 1 - clamp((i - low) / (high - low), 0, 1)
    f_i        <- f_i / s * (1 - smooth_i) + f_i * smooth_i

and attention logits get the extra factor mscale^2 with mscale = 0.1 * m * ln(s) + 1
(`yarn_softmax_scale`). For V3 (d=64, base 1e4, L0=4096, s=40): low=10, high=23.

Llama 3.1's scaling (HF rope_type "llama3") works on wavelengths lambda_i = 2*pi / f_i with
two thresholds, lambda_low = L0 / low_freq_factor and lambda_high = L0 / high_freq_factor:

    lambda_i < lambda_high          f_i kept (high frequencies)
    lambda_i > lambda_low           f_i / s
    otherwise                       (1 - a) f_i / s + a f_i,   a = (L0 / lambda_i - low) / (high - low)

with no factor on the logits or on cos/sin. For Llama 3.1 (s=8, low=1, high=4, L0=8192).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class YarnScaling:
    factor: float = 1.0  # s; 1.0 means plain RoPE
    original_max_seq_len: int = 4096  # L0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0

    @property
    def enabled(self) -> bool:
        return self.factor > 1.0


@dataclass(frozen=True)
class Llama3Scaling:
    factor: float = 8.0  # s
    original_max_seq_len: int = 8192  # L0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0


def _yarn_mscale(factor: float, mscale: float) -> float:
    return 1.0 if factor <= 1.0 else 0.1 * mscale * math.log(factor) + 1.0


def yarn_softmax_scale(base_scale: float, yarn: YarnScaling | None) -> float:
    """Attention logit scale under YaRN: base * (mscale(s, mscale_all_dim))^2.

    DeepSeek's inference code uses `mscale` for this (HF uses `mscale_all_dim` and divides
    cos/sin by mscale(s, mscale)/mscale(s, mscale_all_dim), which is 1 when the two match,
    as in every shipped DeepSeek config)."""
    if yarn is None or not yarn.enabled:
        return base_scale
    m = _yarn_mscale(yarn.factor, yarn.mscale_all_dim)
    return base_scale * m * m


def _llama3_scale(freqs: torch.Tensor, llama3: Llama3Scaling) -> torch.Tensor:
    wavelen = 2 * math.pi / freqs
    s, low, high = llama3.factor, llama3.low_freq_factor, llama3.high_freq_factor
    a = (llama3.original_max_seq_len / wavelen - low) / (high - low)
    out = torch.where(wavelen > llama3.original_max_seq_len / low, freqs / s, (1 - a) * freqs / s + a * freqs)
    return torch.where(wavelen < llama3.original_max_seq_len / high, freqs, out)


def rope_frequencies(dim: int, theta: float, yarn: YarnScaling | None = None,
                     llama3: Llama3Scaling | None = None) -> torch.Tensor:
    """Per-pair angular frequencies, (dim/2,) float64 -> float32, YaRN-corrected if enabled,
    or Llama-3.1-scaled when `llama3` is given."""
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    if llama3 is not None:
        freqs = _llama3_scale(freqs, llama3)
    if yarn is not None and yarn.enabled:
        def corr_dim(rot: float) -> float:
            return dim * math.log(yarn.original_max_seq_len / (rot * 2 * math.pi)) / (2 * math.log(theta))

        low = max(math.floor(corr_dim(yarn.beta_fast)), 0)
        high = min(math.ceil(corr_dim(yarn.beta_slow)), dim - 1)
        if low == high:
            high += 0.001  # avoid a zero-width ramp
        ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
        smooth = 1 - ramp
        freqs = freqs / yarn.factor * (1 - smooth) + freqs * smooth
    return freqs.float()


def precompute_freqs_cis(dim: int, seqlen: int, theta: float, yarn: YarnScaling | None = None,
                         llama3: Llama3Scaling | None = None) -> torch.Tensor:
    """Unit complex rotations e^{i * pos * f}, shape (seqlen, dim/2), complex64."""
    freqs = rope_frequencies(dim, theta, yarn, llama3)
    angles = torch.outer(torch.arange(seqlen, dtype=torch.float32), freqs)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rotary(x: torch.Tensor, freqs_cis: torch.Tensor, interleaved: bool = True) -> torch.Tensor:
    """Rotate the last dim of x (B, T, H, D) by freqs_cis: (>= T, D/2), the same positions
    0..T-1 for every sequence, or (B, T, D/2), each sequence's own positions (decoding).
    Computed in fp32."""
    dtype = x.dtype
    bsz, seqlen, n_heads, dim = x.shape
    if freqs_cis.dim() == 3:
        rot = freqs_cis.view(bsz, seqlen, 1, dim // 2)
    else:
        rot = freqs_cis[:seqlen].view(1, seqlen, 1, dim // 2)
    xf = x.float()
    if interleaved:
        xc = torch.view_as_complex(xf.reshape(bsz, seqlen, n_heads, dim // 2, 2))
        out = torch.view_as_real(xc * rot).flatten(3)
    else:
        x1, x2 = xf[..., : dim // 2], xf[..., dim // 2 :]
        cos, sin = rot.real, rot.imag
        out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return out.to(dtype)
