"""Agreement between data-parallel training processes (a no-op in a single process).

Every rank must take the same decision at the same step, or a collective call hangs: a
stop request or a timed checkpoint seen by one rank is shared with all before acting.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist


def local_rank() -> int:
    """This process's GPU index on its machine (0 outside torchrun)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def world_size() -> int:
    """How many training processes torchrun started (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


#: the Trainer's default ddp_timeout, for a group started before the Trainer starts one
GROUP_TIMEOUT = timedelta(seconds=1800)


def join(device: str) -> None:
    """Before anything touches the GPU: this rank's GPU as the current one (the probe's
    memory counters and every allocation without a device go there, not to GPU 0), and
    under torchrun the process group, so the ranks agree on the probed batch before the
    Trainer starts (accelerate takes over a group it finds). A no-op on the CPU."""
    if device != "cuda":
        return
    torch.cuda.set_device(local_rank())
    if world_size() > 1 and not dist.is_initialized():
        dist.init_process_group("nccl", timeout=GROUP_TIMEOUT)


def distributed() -> bool:
    """Whether this process is one of several in a process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def agree_max(value: int) -> int:
    """The largest of the values every rank passes."""
    if not distributed():
        return value
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    tensor = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def barrier() -> None:
    """Wait until every rank gets here."""
    if distributed():
        dist.barrier()
