"""Distributed helpers: everything torchrun-specific lives here, and all of it works with one process.

`torchrun --nproc_per_node=N train.py ...` sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT;
`init_distributed()` reads them and joins the process group (NCCL on GPUs, gloo on CPU). Without those
variables (plain `python train.py`) nothing is initialised and every helper below degrades to the
single-process answer: rank 0 of 1, `barrier()` is a no-op, reductions return their input.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as torch_dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job. `initialized` is False for a plain single-process run."""

    rank: int
    world_size: int
    local_rank: int
    backend: str | None
    initialized: bool


def is_initialized() -> bool:
    """True when a process group is up (torchrun with WORLD_SIZE > 1)."""
    return torch_dist.is_available() and torch_dist.is_initialized()


def get_rank() -> int:
    return torch_dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return torch_dist.get_world_size() if is_initialized() else 1


def get_local_rank() -> int:
    """Index of this process on its machine (selects its GPU); 0 without torchrun."""
    return int(os.environ.get("LOCAL_RANK", 0)) if is_initialized() else 0


def is_main_process() -> bool:
    """Rank 0 writes files, logs and progress bars; the others stay quiet."""
    return get_rank() == 0


def init_distributed(backend: str | None = None) -> DistInfo:
    """Join the process group described by torchrun's environment variables, if any.

    backend: None chooses NCCL when CUDA is available, else gloo. With WORLD_SIZE unset or 1 no group is
    created (a one-process job needs none, and tests then run without ports or env vars). Calling it again
    after a successful initialisation is harmless. On CUDA the process is pinned to GPU `LOCAL_RANK` so that
    NCCL collectives and `torch.device("cuda")` refer to this process's own GPU.
    """
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size > 1 and not is_initialized():
        for var in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
            if var not in os.environ:
                raise RuntimeError(f"WORLD_SIZE={world_size} but {var} is not set; start multi-process runs "
                                   f"with `torchrun --nproc_per_node=N train.py ...`")
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        _bind_group_defaults_before_init()
        torch_dist.init_process_group(backend=backend, init_method="env://")
    if not is_initialized():
        return DistInfo(rank=0, world_size=1, local_rank=0, backend=None, initialized=False)
    return DistInfo(rank=get_rank(), world_size=get_world_size(), local_rank=get_local_rank(),
                    backend=torch_dist.get_backend(), initialized=True)


def _bind_group_defaults_before_init() -> None:
    """Import torch.distributed.nn.functional while no process group exists.

    Its ten collectives are declared `def broadcast(tensor, src, group=group.WORLD)`: the default is evaluated
    at import, so a first import *after* init_process_group (torchvision imports it through torch._dynamo;
    evaluate.py imports the model stack after joining the group) stores the live WORLD group in ten
    `__defaults__` tuples for the life of the interpreter. destroy_process_group() then only unregisters it:
    the C++ ProcessGroupGloo is never freed, and its threads (gloo_tcp_loop, two pt_gloo_runloop) run on
    through interpreter finalisation and the C++ static destructors of exit(), until exit_group() kills
    them (issue 20: rank 1 aborted at exit with 'terminate called without an active exception'). Imported
    here first, the defaults are None and destroy_distributed() really stops those threads.
    """
    import torch.distributed.nn.functional  # noqa: F401  (for its import-time defaults, see above)


def destroy_distributed(synchronize: bool = False) -> None:
    """Leave the process group at the end of train.py / evaluate.py; a no-op for single-process runs.

    synchronize: first wait (barrier) until every rank has got here, so that no rank tears its connections
    down while a peer still has a collective in flight or still reaches the store (rank 0 hosts it when the
    job is started without torchrun's agent). Only for a rank that finished normally (the CLIs pass True
    then): a failed rank cannot know which collective its peers are in, and torchrun stops them when it
    exits non-zero. A barrier that fails (a peer died) is reported as a warning and the group is destroyed
    all the same. Afterwards the backend's threads are gone (see _bind_group_defaults_before_init): the
    interpreter exits with no C++ thread of the process group still running.
    """
    if not is_initialized():
        return
    if synchronize and get_world_size() > 1:
        try:
            barrier()
        except RuntimeError as e:  # gloo/NCCL report a vanished peer as RuntimeError (DistBackendError)
            warnings.warn(f"rank {get_rank()}: the barrier before leaving the process group failed ({e}); "
                          f"leaving anyway", RuntimeWarning, stacklevel=2)
    torch_dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (e.g. until rank 0 has written a file the others read)."""
    if get_world_size() > 1:
        if torch_dist.get_backend() == "nccl":
            torch_dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            torch_dist.barrier()


def _collective_device() -> torch.device:
    # NCCL only reduces CUDA tensors; gloo only CPU ones.
    if is_initialized() and torch_dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def reduce_loss_dict(loss_dict: dict[str, torch.Tensor]) -> dict[str, float]:
    """Mean of each scalar loss over all ranks, as Python floats (for logging and the non-finite check).

    loss_dict: name -> scalar tensor, with the same names on every rank. All values travel in one
    all_reduce. A NaN or inf on any rank makes that entry non-finite everywhere, so every rank takes the
    same decision about stopping. Costs one device->host copy per call.
    """
    names = sorted(loss_dict)
    if not names:
        return {}
    values = torch.stack([loss_dict[k].detach().float().reshape(()) for k in names])
    if get_world_size() > 1:
        values = values.to(_collective_device())
        torch_dist.all_reduce(values, op=torch_dist.ReduceOp.SUM)
        values = values / get_world_size()
    return dict(zip(names, values.cpu().tolist()))


def all_gather_object(obj: Any) -> list[Any]:
    """One picklable object from every rank, in rank order (a one-element list with one process)."""
    if get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * get_world_size()
    torch_dist.all_gather_object(out, obj)
    return out

