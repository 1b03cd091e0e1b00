"""Small helpers for data-parallel training with ``torchrun`` (DDP), usable unchanged in one process.

Every helper degrades to the single-process behaviour when ``torch.distributed`` is not
initialised: ``rank() == 0``, ``world_size() == 1``, the gathers return their input.  Library code
(the SSL losses, the MoCo queue) can therefore call them unconditionally.

Conventions
-----------
* Gathers concatenate along dim 0 in rank order, so the gathered global batch has the same order
  as the batch one process would have seen (rank r holds rows ``[r·B, (r+1)·B)``).
* :func:`gather_with_grad` is differentiable: its backward sums the incoming gradients over all
  ranks and returns each rank its own slice, so a loss that uses the gathered tensor as negatives
  yields, after DDP's gradient averaging, the same gradient as one process computing the loss over
  the whole batch (the mean over ranks of per-rank means over equal-sized local batches).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


def is_dist() -> bool:
    """True inside an initialised process group."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    """True on the process that writes files and logs (rank 0, or the only process)."""
    return rank() == 0


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward hands each rank the sum over ranks of the gradient of its rows.

    Written on the public ``all_gather`` / ``all_reduce`` (works on gloo and nccl alike); the
    backward all-reduces the whole (N, ...) gradient, which for embedding-sized tensors costs less
    than it saves in code (``torch.distributed.nn.functional.all_gather`` is deprecated and falls
    back to all-to-all on gloo).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.lo, ctx.hi = dist.get_rank() * x.shape[0], (dist.get_rank() + 1) * x.shape[0]
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.lo:ctx.hi]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (B, ...) from all ranks along dim 0, keeping the autograd graph.

    Identity when not distributed.  All ranks must pass the same shape.
    """
    if not is_dist() or world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


@torch.no_grad()
def gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (B, ...) from all ranks along dim 0, without gradient (e.g. MoCo keys)."""
    if not is_dist() or world_size() == 1:
        return x.detach()
    x = x.detach().contiguous()
    out = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(out, x)
    return torch.cat(out, dim=0)


@dataclass(frozen=True)
class DistContext:
    """Where this process runs: its rank among ``world_size`` processes and its device."""
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def default_backend() -> str:
    """``nccl`` when CUDA is available, else ``gloo`` (the CPU backend)."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def setup_from_env(backend: str | None = None) -> DistContext:
    """Join the process group described by torchrun's environment; a no-op for a plain launch.

    torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``.
    Without ``WORLD_SIZE`` (or with ``WORLD_SIZE=1``) nothing is initialised and the context
    describes one process on ``cuda`` (if available) or ``cpu``.  With CUDA each process binds to
    ``cuda:LOCAL_RANK``.  ``backend`` defaults to :func:`default_backend`; ``nccl`` without CUDA is
    refused with a ValueError, since it cannot work.
    """
    ws = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank if ws > 1 else torch.cuda.current_device())
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    if ws <= 1:
        return DistContext(rank=0, world_size=1, local_rank=0, device=device)
    backend = backend or default_backend()
    if backend == "nccl" and not cuda:
        raise ValueError("distributed backend 'nccl' needs CUDA, which is not available here; "
                         "use backend 'gloo' for CPU training")
    if not is_dist():
        dist.init_process_group(backend=backend, init_method="env://")
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(),
                       local_rank=local_rank, device=device)


def barrier() -> None:
    if is_dist():
        dist.barrier()


def cleanup() -> None:
    """Leave the process group (safe to call when none was joined)."""
    if is_dist():
        dist.destroy_process_group()
