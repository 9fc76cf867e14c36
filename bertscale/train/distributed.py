"""Rank and world size, read once from the environment, and the few collectives the training loop needs.

Launchers describe a process in different variables: the DeepSpeed launcher and torchrun set RANK/WORLD_SIZE/
LOCAL_RANK, SLURM's srun sets SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID, and a bare `python` sets nothing (a
single rank that starts its own one-process group). This module is the only place outside DeepSpeed that calls
`torch.distributed`.

Failure of a peer: the process group is created with the configured collective timeout, so a collective never
waits longer than that for a dead host or a cut link. With gloo a killed peer is usually seen at once (its TCP
connection closes); a silent peer (link down, host frozen) is seen when the timeout expires. `peer_failure`
turns either into a `PeerLostError` with one clear line naming the peer, and the rank exits with
`EXIT_PEER_LOST` so launchers and schedulers can tell "restart me" from a bug.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from bertscale.errors import BertscaleError
from bertscale.train import deepspeed_engine

log = logging.getLogger(__name__)

DEFAULT_MASTER_PORT = 29500  # torch's and DeepSpeed's default rendezvous port


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = DEFAULT_MASTER_PORT
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


def free_port() -> int:
    """A local port nothing listens on right now (the OS picks it)."""
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
                       int(env.get("LOCAL_WORLD_SIZE", world)), addr,
                       int(env.get("MASTER_PORT", DEFAULT_MASTER_PORT)), "torch")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        world = int(env["SLURM_NTASKS"])
        per_node = int(env.get("SLURM_NTASKS_PER_NODE", "").split("(")[0] or world)
        return DistEnv(int(env["SLURM_PROCID"]), world, int(env.get("SLURM_LOCALID", 0)), per_node, addr,
                       int(env.get("MASTER_PORT", DEFAULT_MASTER_PORT)), "slurm")
    port = int(env["MASTER_PORT"]) if "MASTER_PORT" in env else free_port()
    return DistEnv(master_addr=addr, master_port=port)


# The launcher variables `init` exports; `process_group` puts back what was there before.
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def init(env: DistEnv, timeout_s: float = 1800.0) -> bool:
    """Join (or start) the process group; returns True if this call created it.

    `timeout_s` bounds every collective (and the start-up rendezvous): a peer silent for longer is an error.
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
    dist.init_process_group(backend, store=_rendezvous_store(env, timeout_s), rank=env.rank,
                            world_size=env.world_size, timeout=timedelta(seconds=timeout_s))
    log.debug("rank %d/%d joined a %s group at %s:%d", env.rank, env.world_size, backend, env.master_addr,
              env.master_port)
    return True


_groups_created = 0  # groups this process has created: each rendezvous gets keys of its own


def _rendezvous_store(env: DistEnv, timeout_s: float) -> dist.Store:
    """The TCP store the ranks meet in, under a prefix unique to this group.

    A process may create a group, destroy it and create another (`pretrain()` called twice in one job). Under
    torchrun the store is the agent's and outlives our groups, and rank 0's own store server is shared by every
    group on its port (multi-tenant): without a fresh prefix the second rendezvous reads the first one's keys
    and waits forever. Every rank creates the same number of groups, so the prefixes agree.
    """
    global _groups_created
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # torchrun's agent hosts the server
    store = dist.TCPStore(env.master_addr, env.master_port, env.world_size, is_master=env.rank == 0 and not agent,
                          timeout=timedelta(seconds=timeout_s), multi_tenant=True)
    _groups_created += 1
    return dist.PrefixStore(f"bertscale/group{_groups_created}", store)


def shutdown() -> None:
    """Destroy every process group of this process, while the interpreter is still whole.

    Gloo's worker threads hold finished work (and its tensors); a group left for interpreter exit is torn down
    after Python's finalisation has begun, and its C++ threads can then be destroyed while still joinable:
    "terminate called without an active exception", SIGABRT, a failed job after a complete run. Purely local for
    gloo (no collective), so it cannot wait on a peer that has already left.
    """
    if not dist.is_initialized():
        return
    # DeepSpeed's own destroy also drops the groups it derived from ours; without DeepSpeed, torch's.
    if not deepspeed_engine.destroy_comm():
        dist.destroy_process_group()


@contextlib.contextmanager
def process_group(env: DistEnv, timeout_s: float = 1800.0) -> Iterator[bool]:
    """The block runs inside the job's process group; afterwards the process is as it was found.

    Yields whether this call created the group. A group it created is destroyed at the end: on success, on a
    `BertscaleError` (a user error every rank reports) and always in a single process. It is left alone after a
    lost peer or a bug on one of several ranks: destroying a group whose peer is gone can block, and those
    paths end the process with `os._exit`. The launcher variables `init` exported are restored either way.
    """
    saved = {key: os.environ.get(key) for key in LAUNCH_VARS}
    created = init(env, timeout_s)
    clean = False
    try:
        yield created
        clean = True
    except BertscaleError as e:
        clean = not isinstance(e, PeerLostError)
        raise
    finally:
        if created and (clean or env.world_size == 1):
            shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


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


def all_gather_object(obj: object) -> list[object]:
    """Every rank's value of a small picklable object, in rank order, on every rank."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Peer failures
# ----------------------------------------------------------------------------------------------------------------
# Exit status of a rank whose peer died or went silent: EX_TEMPFAIL from sysexits.h ("try again later"), since
# the job resumes from its last checkpoint once every host is back.
EXIT_PEER_LOST = 75

# What gloo and NCCL say when a peer is gone (connection closed/reset), unreachable (this host's link is down:
# a send fails at once) or silent (timeout).
_LOST = re.compile(r"connection (closed|reset)|broken pipe|connection refused|socket closed|remote worker crash"
                   r"|network is unreachable|no route to host|host is unreachable"
                   r"|nccl.*(remote|unhandled system error)|ncclRemoteError", re.I)
_TIMEOUT = re.compile(r"timed out|timeout|deadline exceeded", re.I)
_ADDRESS = re.compile(r"\[?(\d{1,3}(?:\.\d{1,3}){3})\]?:\d+")


class PeerLostError(BertscaleError):
    """A peer rank died or stopped answering; the job must be restarted from its last checkpoint."""

    exit_code = EXIT_PEER_LOST


def local_address(master_addr: str) -> str:
    """This host's address towards the master: the gloo/NCCL interface's IPv4 if one is named, else the source
    address the kernel picks for the master (a UDP connect sends nothing)."""
    import psutil

    ifname = os.environ.get("GLOO_SOCKET_IFNAME") or os.environ.get("NCCL_SOCKET_IFNAME") or ""
    for addr in psutil.net_if_addrs().get(ifname.split(",")[0], []):
        if addr.family == socket.AF_INET:
            return str(addr.address)
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((master_addr, 9))
        return str(s.getsockname()[0])
    return socket.gethostname()


def gather_addresses(env: DistEnv) -> list[str]:
    """Every rank's address, in rank order (so an error can say which host went away)."""
    return [str(a) for a in all_gather_object(local_address(env.master_addr))]


def classify_comm_error(error: BaseException) -> str | None:
    """'timeout' (a silent peer), 'lost' (a peer's connection closed), or None (not a communication failure)."""
    if not isinstance(error, RuntimeError):
        return None
    text = str(error)
    if _LOST.search(text):
        return "lost"
    if _TIMEOUT.search(text) and ("gloo" in text.lower() or "recv" in text or "send" in text
                                  or isinstance(error, dist.DistError)):
        return "timeout"
    return None


def describe_peer_failure(error: BaseException, kind: str, env: DistEnv, addresses: list[str], where: str,
                          timeout_s: float, resume_hint: str) -> str:
    """One line: which peer, during what, how it failed, and how to resume."""
    match = _ADDRESS.search(str(error))
    others = [r for r in range(env.world_size) if r != env.rank]
    if match and match.group(1) in addresses:
        ranks = [r for r, a in enumerate(addresses) if a == match.group(1) and r != env.rank] or others
    else:
        ranks = others if len(others) == 1 else []
    if ranks:
        peer = f"rank {ranks[0]} at {addresses[ranks[0]]}" if ranks[0] < len(addresses) else f"rank {ranks[0]}"
    else:
        peer = "a peer rank"
    how = (f"collective timed out after {timeout_s:g} s" if kind == "timeout"
           else f"connection failed: {_first_sentence(error)}")
    verb = "stopped responding" if kind == "timeout" else "was lost"
    return f"{peer} {verb} during {where} ({how}); {resume_hint}"


def _first_sentence(error: BaseException) -> str:
    text = re.sub(r"^\[[^\]]*\]\s*", "", str(error).strip())  # drop gloo's "[file.cc:123]" prefix
    return text.split(". ")[0].strip()[:200]


@contextlib.contextmanager
def peer_failure(env: DistEnv, addresses: list[str], where: Callable[[], str], timeout_s: float,
                 resume_hint: Callable[[], str]) -> Iterator[None]:
    """Turn a communication failure inside the block into a `PeerLostError`; anything else passes through."""
    try:
        yield
    except RuntimeError as e:
        kind = classify_comm_error(e)
        if kind is None or env.world_size == 1:
            raise
        raise PeerLostError(describe_peer_failure(e, kind, env, addresses, where(), timeout_s, resume_hint())
                            ) from e


class Watchdog:
    """A last line of defence behind the collective timeout: if the training loop makes no progress for
    `factor` x the timeout (a collective blocked somewhere the backend's own timeout does not reach, seen with
    gloo when a link goes down mid-transfer), print one line and exit with `EXIT_PEER_LOST`.

    The loop calls `beat(where)` at every step and around checkpoints; `stop()` ends the thread."""

    def __init__(self, timeout_s: float, resume_hint: Callable[[], str], factor: float = 2.0) -> None:
        self.limit = timeout_s * factor
        self.timeout_s = timeout_s
        self.resume_hint = resume_hint
        self.where = "start-up"
        self.last = time.monotonic()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="bertscale-watchdog", daemon=True)

    def start(self) -> "Watchdog":
        self._thread.start()
        return self

    def beat(self, where: str) -> None:
        self.where, self.last = where, time.monotonic()

    def stop(self) -> None:
        """End the thread and wait for it (at most one polling interval)."""
        self._stopped.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()

    def _watch(self) -> None:
        while not self._stopped.wait(min(self.limit / 10, 5.0)):
            idle = time.monotonic() - self.last
            if idle >= self.limit:
                print(f"error: a peer stopped responding during {self.where} (no progress for {idle:.0f} s, over "
                      f"twice train.collective_timeout_s={self.timeout_s:g} s); {self.resume_hint()}",
                      file=sys.stderr, flush=True)
                os._exit(EXIT_PEER_LOST)  # the main thread is stuck in the backend: no clean way out
