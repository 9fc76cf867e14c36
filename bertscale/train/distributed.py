"""Rank and world size, read once from the environment, and the few collectives the training loop needs.

Launchers describe a process in different variables: the DeepSpeed launcher and torchrun set RANK/WORLD_SIZE/
LOCAL_RANK, SLURM's srun sets SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID, and a bare `python` sets nothing (a
single rank that starts its own one-process group). This module is the only place outside DeepSpeed that calls
`torch.distributed`.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    source: str = "single"  # which launcher's variables were found: torch, slurm or single

    @property
    def is_main(self) -> bool:
        """Rank 0: the only rank that logs, writes metrics and exports."""
        return self.rank == 0

    @property
    def node_rank(self) -> int:
        return self.rank // max(self.local_world_size, 1)

    def device(self) -> torch.device:
        if torch.cuda.is_available():
            return torch.device("cuda", self.local_rank % torch.cuda.device_count())
        return torch.device("cpu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def read_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Rank/world from torch-style variables, else SLURM's, else a single process on a free local port."""
    env = os.environ if environ is None else environ
    addr = env.get("MASTER_ADDR", "127.0.0.1")
    if "RANK" in env and "WORLD_SIZE" in env:
        world = int(env["WORLD_SIZE"])
        return DistEnv(int(env["RANK"]), world, int(env.get("LOCAL_RANK", 0)),
                       int(env.get("LOCAL_WORLD_SIZE", world)), addr, int(env.get("MASTER_PORT", 29500)), "torch")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        world = int(env["SLURM_NTASKS"])
        per_node = int(env.get("SLURM_NTASKS_PER_NODE", "").split("(")[0] or world)
        return DistEnv(int(env["SLURM_PROCID"]), world, int(env.get("SLURM_LOCALID", 0)), per_node, addr,
                       int(env.get("MASTER_PORT", 29500)), "slurm")
    port = int(env["MASTER_PORT"]) if "MASTER_PORT" in env else _free_port()
    return DistEnv(master_addr=addr, master_port=port)


def init(env: DistEnv) -> bool:
    """Join (or start) the process group; returns True if this call created it.

    The torch-style variables are exported too, because DeepSpeed reads them when it wraps the group.
    """
    os.environ.update(RANK=str(env.rank), WORLD_SIZE=str(env.world_size), LOCAL_RANK=str(env.local_rank),
                      LOCAL_WORLD_SIZE=str(env.local_world_size), MASTER_ADDR=env.master_addr,
                      MASTER_PORT=str(env.master_port))
    if dist.is_initialized():
        if dist.get_world_size() != env.world_size:
            raise RuntimeError(f"a process group of size {dist.get_world_size()} exists; expected {env.world_size}")
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(env.device())
    dist.init_process_group(backend, init_method=f"tcp://{env.master_addr}:{env.master_port}", rank=env.rank,
                            world_size=env.world_size, timeout=timedelta(minutes=30))
    log.debug("rank %d/%d joined a %s group at %s:%d", env.rank, env.world_size, backend, env.master_addr,
              env.master_port)
    return True


def all_reduce(values: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Sum (or max) a small float64 tensor over all ranks, in place; a no-op on one process."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        device = values.device
        # NCCL reduces only GPU tensors; gloo only CPU ones.
        work = values.to("cuda") if dist.get_backend() == "nccl" else values
        dist.all_reduce(work, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
        values.copy_(work.to(device))
    return values


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def broadcast_object(obj: object, src: int = 0) -> object:
    """Rank `src`'s value of a small picklable object, on every rank."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
