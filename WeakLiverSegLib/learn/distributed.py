"""torch.distributed for the shared training loop: ``torchrun --nproc_per_node=N -m WeakLiverSegLib train ...``.

``init_from_env(device)`` starts the process group from torchrun's variables (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``): gloo on the CPU, nccl on CUDA
(each process then uses ``cuda:LOCAL_RANK``).  Without those variables (a plain run) everything
here is a no-op, so a single process behaves exactly as before.

Data parallelism keeps the *global* batch of a single process: every rank draws the same batch
from its identically seeded sampler and keeps its own contiguous slice of the rows
(``shard_rows``), DDP averages the gradients (= the gradient of the global mean loss when the
shards are equal), and ``mean`` averages the logged loss over the ranks.  Rank 0 alone writes
checkpoints, logs and the model (``is_main``); checkpoints hold the unwrapped networks and the
shared RNG state, so ``--resume`` works with another world size (the batch size must divide).
BatchNorm statistics are per shard (not synchronised), the one difference from a single process.
"""

from __future__ import annotations

import os

import torch

from ..errors import InputError


def is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    return torch.distributed.get_rank() if is_distributed() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def init_from_env(device: str) -> str:
    """Join the torchrun process group when launched by torchrun; returns this process's device."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or is_distributed():
        return device
    cuda = str(device).startswith("cuda")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise InputError(f"torchrun: LOCAL_RANK {local} but only {torch.cuda.device_count()} GPU(s) visible; "
                             f"use --nproc_per_node={torch.cuda.device_count()} or less")
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    torch.distributed.init_process_group(backend="nccl" if cuda else "gloo")
    return device


def shutdown() -> None:
    """Leave the process group at the end of a torchrun process (a no-op otherwise)."""
    if is_distributed():
        torch.distributed.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        torch.distributed.barrier()


def wrap(net: torch.nn.Module) -> torch.nn.Module:
    """DDP around ``net`` in a distributed run, else ``net`` itself (call the result, save ``net``)."""
    if not is_distributed():
        return net
    from torch.nn.parallel import DistributedDataParallel

    dev = next(net.parameters()).device
    return DistributedDataParallel(net, device_ids=[dev.index] if dev.type == "cuda" else None,
                                   find_unused_parameters=True)


def shard_rows(batch: dict) -> dict:
    """This rank's contiguous slice of every tensor's rows (the global batch split evenly)."""
    n = world_size()
    if n == 1:
        return batch
    r = rank()
    out = {}
    for key, value in batch.items():
        rows = value.shape[0]
        if rows % n:
            raise InputError(f"batch of {rows} rows cannot be split over {n} processes; set batch_size to a "
                             f"multiple of {n} (the global batch is kept equal to a single process's)")
        size = rows // n
        out[key] = value[r * size:(r + 1) * size]
    return out


def mean(value: float) -> float:
    """The average of ``value`` over the ranks (the global batch's mean loss for equal shards)."""
    if not is_distributed():
        return value
    t = torch.tensor([float(value)], dtype=torch.float64)
    if torch.distributed.get_backend() == "nccl":
        t = t.cuda()
    torch.distributed.all_reduce(t)
    return float(t.item()) / world_size()
