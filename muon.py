"""Muon whose Newton–Schulz iteration runs in the precision the device multiplies fast.

torch.optim.Muon always orthogonalizes in bf16. That suits GPUs and CPUs whose oneDNN has bf16
kernels, but on an AVX2-only CPU a bf16 matmul falls back to a scalar loop ~40x slower than fp32,
and one Muon step of the CPU preset went from milliseconds to 0.7 s. The math is in docs/muon.md.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch


def newton_schulz(update: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float,
                  dtype: torch.dtype) -> torch.Tensor:
    """The quintic iteration that pushes every singular value of `update` towards one, in `dtype`
    (torch's own runs the same products in bf16)."""
    a, b, c = coefficients
    x = update.to(dtype)
    wide = update.size(0) <= update.size(1)  # iterate on the side whose Gram matrix is smaller
    x = x if wide else x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x if wide else x.T


class Muon(torch.optim.Muon):
    """torch.optim.Muon (same hyperparameters, state and checkpoints) with the orthogonalization
    in `ns_dtype`: bf16 reproduces torch's update bit for bit, fp32 is the fast choice where bf16
    matmuls are emulated."""

    def __init__(self, params: Iterable[torch.Tensor], ns_dtype: torch.dtype, **kwargs):
        super().__init__(params, **kwargs)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["adjust_lr_fn"] not in (None, "original"):
                raise ValueError(f"Muon here scales steps by sqrt(max(1, rows/cols)) only, not {group['adjust_lr_fn']}")
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(param.grad, memory_format=torch.preserve_format)
                momentum, grad = state["momentum_buffer"], param.grad
                momentum.lerp_(grad, 1 - group["momentum"])
                update = grad.lerp(momentum, group["momentum"]) if group["nesterov"] else momentum
                update = newton_schulz(update, group["ns_coefficients"], group["ns_steps"], group["eps"], self.ns_dtype)
                rows, cols = param.shape
                param.mul_(1 - group["lr"] * group["weight_decay"])
                param.add_(update, alpha=-group["lr"] * math.sqrt(max(1, rows / cols)))
        return loss
