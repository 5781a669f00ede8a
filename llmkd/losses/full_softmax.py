"""Next-item cross-entropy over the whole catalog, computed in row chunks with the gradient fused in.

`F.cross_entropy(h @ items.T, y)` holds the (P, N) logits, their softmax and their gradient at once: on
Amazon Beauty (12,101 items) a batch of 256 histories of 50 items is 12,800 rows, ~600 MB per copy,
allocated afresh every step. `full_softmax_loss` walks the rows `chunk` at a time through one reused
(chunk, N) buffer and, while the chunk's softmax is in hand, accumulates both gradients (the softmax
minus the one-hot target, times the other factor), so backward is a multiplication by the saved
gradients. Same loss and gradients as `F.cross_entropy` up to float rounding (tests/test_losses.py);
the cost on this machine is measured by `scripts/benchmark_scale_micro.py softmax` (`results/`).

The idea is the one of fused linear cross-entropy kernels (Liger-Kernel, Apple's Cut Cross-Entropy);
written here for the CPU because those libraries target GPUs (Triton) only.
"""

from __future__ import annotations

import torch

DEFAULT_CHUNK_ELEMENTS = 1 << 22
"""Logits held at once (16 MiB of float32): large enough for efficient matrix products, small enough
to stay out of the allocator's fresh-mapping path."""


class _FusedSoftmaxCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, items: torch.Tensor, y: torch.Tensor, chunk: int) -> torch.Tensor:
        P, N = len(h), len(items)
        grad_h = torch.empty_like(h)
        grad_items = torch.zeros_like(items)
        buf = torch.empty(min(chunk, P), N, dtype=h.dtype, device=h.device)
        total = torch.zeros((), dtype=torch.float64, device=h.device)
        for s in range(0, P, chunk):
            e = min(P, s + chunk)
            hc, yc = h[s:e], y[s:e]
            logits = torch.mm(hc, items.T, out=buf[: e - s])  # (c, N)
            rows = torch.arange(e - s, device=h.device)
            target = logits[rows, yc]  # (c,)
            top = logits.amax(1, keepdim=True)  # (c, 1)
            exps = logits.sub_(top).exp_()  # one exp per logit, in place
            norm = exps.sum(1, keepdim=True)  # (c, 1)
            total += (norm.log() + top).squeeze(1).sub_(target).sum(dtype=torch.float64)  # sum of log-sum-exp - target
            probs = exps.div_(norm)  # softmax
            probs[rows, yc] -= 1.0  # d loss_row / d logits
            torch.mm(probs, items, out=grad_h[s:e])
            grad_items.addmm_(probs.T, hc)
        ctx.save_for_backward(grad_h.div_(P), grad_items.div_(P))
        return (total / P).to(h.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_items = ctx.saved_tensors
        return grad_out * grad_h, grad_out * grad_items, None, None


def full_softmax_loss(h: torch.Tensor, items: torch.Tensor, y: torch.Tensor,
                      chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> torch.Tensor:
    """Mean cross-entropy of states h (P, d) against every item vector items (N, d), targets y (P,) int64;
    = `F.cross_entropy(h @ items.T, y)` without the (P, N) tensors (module docstring)."""
    assert h.dim() == 2 and items.dim() == 2 and h.shape[1] == items.shape[1] and y.shape == (len(h),)
    if len(h) == 0:
        return (h.sum() + items.sum()) * 0.0
    chunk = max(1, chunk_elements // max(len(items), 1))
    with torch.autocast(h.device.type, enabled=False):  # the buffer and the sums stay float32 under mixed precision
        return _FusedSoftmaxCE.apply(h.float(), items.float(), y, chunk)
