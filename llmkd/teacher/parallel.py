"""Data parallelism for LoRA tuning: each process encodes its share of a step's texts, the vectors are
gathered with their gradients, and the gradients averaged with one all-reduce (torch.distributed, set up
by `accelerate launch`).

The model is not wrapped in DDP: a tuning step runs it several times (history chunks, item chunks) and
PEFT puts LoRA on modules whose output the pooled vector never uses (BERT's pooler), which DDP's reducer
refuses unless it searches the graph for unused parameters on every step. One explicit all-reduce of the
flattened LoRA gradients (`average_gradients`) does the same job, and its size is the payload that the
cost model in `llmkd.experiments.processes` uses.
"""

from __future__ import annotations

import torch


class GatherWithGrad(torch.autograd.Function):
    """All-gather (n, d) rows of every process in rank order -> (P n, d), with gradients: backward sums
    the gathered gradient over processes and returns this process's rows."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.rows = dist.get_rank(), len(x)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def average_gradients(params: list[torch.nn.Parameter], processes: int) -> None:
    """Mean of every trainable parameter's gradient over processes: one all-reduce of them flattened."""
    import torch.distributed as dist

    with_grad = [p for p in params if p.grad is not None]
    flat = torch.cat([p.grad.reshape(-1) for p in with_grad])
    dist.all_reduce(flat)
    flat /= processes
    for p, g in zip(with_grad, flat.split([p.numel() for p in with_grad]), strict=True):
        p.grad.copy_(g.view_as(p.grad))


def negatives_per_process(wanted: int, num_items: int, processes: int) -> int:
    """Catalog negatives each process encodes: an equal share of `wanted` (rounded up), drawn without
    replacement, so at most num_items // processes; one process: min(wanted, num_items)."""
    return min(-(-min(wanted, num_items) // processes), num_items // processes)
