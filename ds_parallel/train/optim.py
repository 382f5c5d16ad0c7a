"""AdamW with its moments stored in a lower precision (DeepSeek-V3 §3.3: BF16 moments).

    m_t = b1 m_{t-1} + (1 - b1) g          v_t = b2 v_{t-1} + (1 - b2) g^2
    p  <- p (1 - lr wd) - lr m_t / (1 - b1^t) / (sqrt(v_t / (1 - b2^t)) + eps)

torch's AdamW rule exactly (decoupled weight decay, bias correction, eps outside the square
root). The arithmetic runs in fp32 on fp32 masters; only exp_avg and exp_avg_sq are stored
in `moment_dtype`, so they cost 2 + 2 bytes per parameter instead of 4 + 4. With
moment_dtype=float32 the updates equal torch.optim.AdamW's (tests/unit/test_optim.py).
DeepSpeed takes it like any torch optimizer (ZeRO shards its flat fp32 partitions; the
moments live in `state[flat]` as for AdamW, which the checkpoint code reads and writes).
"""
from __future__ import annotations

import math

import torch


class LowPrecisionMomentAdamW(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, moment_dtype: torch.dtype = torch.bfloat16):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.moment_dtype = moment_dtype

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "exp_avg" not in state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, dtype=self.moment_dtype)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=self.moment_dtype)
                state["step"] += 1
                t = state["step"].item()
                grad = p.grad.float()
                m = state["exp_avg"].float().mul_(beta1).add_(grad, alpha=1 - beta1)
                v = state["exp_avg_sq"].float().mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                state["exp_avg"].copy_(m)
                state["exp_avg_sq"].copy_(v)
                p.mul_(1 - lr * wd)
                denom = (v.sqrt() / math.sqrt(1 - beta2 ** t)).add_(eps)
                p.addcdiv_(m, denom, value=-lr / (1 - beta1 ** t))
        return loss


def moment_bytes_report(optimizer, moment_dtype: torch.dtype) -> str:
    """One line: bytes this rank's optimizer keeps for AdamW moments, and what fp32 would cost."""
    numel = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    width = torch.empty((), dtype=moment_dtype).element_size()
    return (f"AdamW moments in {str(moment_dtype).removeprefix('torch.')}: {2 * width * numel / 2**20:.1f} MiB on this "
            f"rank ({2 * (4 - width) * numel / 2**20:.1f} MiB saved against fp32)")
