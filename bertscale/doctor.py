"""`bertscale doctor`: check a node before a distributed run and say what is wrong.

Checks: library versions (and, across nodes, that they match rank 0's), that rank 0's port can be reached (rank 0
serves a tiny handshake on the master port; the other nodes connect to it), free disk for the checkpoints the
config will keep, that every node sees rank 0's checkpoint directory (a marker file rank 0 writes there), the
collective timeout, and the gloo/NCCL environment (interfaces named in *_SOCKET_IFNAME exist, are up and have an
address; MASTER_ADDR resolves).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import socket
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import psutil

import bertscale
from bertscale.config import PipelineConfig
from bertscale.model import BertConfig, config_from_pipeline
from bertscale.train import deepspeed_engine

Status = Literal["ok", "warn", "fail"]


@dataclass
class Check:
    name: str
    status: Status
    detail: str


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)

    def add(self, name: str, status: Status, detail: str) -> None:
        self.checks.append(Check(name, status, detail))

    @property
    def ok(self) -> bool:
        return all(c.status != "fail" for c in self.checks)

    def render(self) -> str:
        marks = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL"}
        lines = [f"[{marks[c.status]}] {c.name}: {c.detail}" for c in self.checks]
        lines.append("all checks passed" if self.ok else "some checks failed: fix the FAIL lines before launching")
        return "\n".join(lines)


def versions() -> dict[str, str]:
    """What must match across nodes for ranks to interoperate."""
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "deepspeed": deepspeed_engine.version(),
        "bertscale": bertscale.__version__,
        "cuda": str(torch.version.cuda),
    }


def checkpoint_bytes(cfg: PipelineConfig, vocab_size: int | None = None) -> int:
    """Bytes of one checkpoint: fp32 weights + two Adam moments (+ bf16/fp16 copy), all ranks together.

    The vocabulary is `vocab_size`, else the configured one (model.vocab_size, else tokenizer.vocab_size): the
    tokenizer may not exist yet when a node is checked."""
    vocab = vocab_size or cfg.model.vocab_size or cfg.tokenizer.vocab_size
    config: BertConfig = config_from_pipeline(cfg, vocab)
    h, layers, inter = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    params = vocab * h + config.max_position_embeddings * h + layers * (4 * h * h + 2 * h * inter) + h * h
    per_param = 4 * 3 + (2 if cfg.train.precision != "fp32" else 0)
    return params * per_param


def check_disk(report: Report, cfg: PipelineConfig) -> None:
    out = cfg.stage_dir("train")
    probe = out
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    need = checkpoint_bytes(cfg) * (cfg.train.keep_checkpoints + 1)
    status: Status = "ok" if free > need else "fail"
    report.add("checkpoint disk", status,
               f"{free / 2**30:.1f} GiB free at {probe}, {need / 2**30:.2f} GiB needed for "
               f"{cfg.train.keep_checkpoints}+1 checkpoints")
    if status == "ok" and not os.access(probe, os.W_OK):
        report.add("checkpoint disk", "fail", f"{probe} is not writable")


def check_env(report: Report, master_addr: str | None) -> None:
    addrs, stats = psutil.net_if_addrs(), psutil.net_if_stats()
    for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        value = os.environ.get(var)
        if not value:
            continue
        names = [n.lstrip("^=") for n in value.split(",")]
        missing = [n for n in names if n and not value.startswith("^") and n not in addrs]
        if missing:
            report.add(var, "fail", f"interface(s) {missing} not on this host (have {sorted(addrs)})")
            continue
        down = [n for n in names if n in stats and not stats[n].isup]
        no_ip = [n for n in names if n in addrs and not any(a.family == socket.AF_INET for a in addrs[n])]
        if down or no_ip:
            report.add(var, "fail", f"interface(s) {down} down, {no_ip} without an IPv4 address: bring them up "
                       "(ip link set <if> up) or name another interface")
        else:
            report.add(var, "ok", value)
    if master_addr:
        try:
            resolved = socket.gethostbyname(master_addr)
            report.add("MASTER_ADDR", "ok", f"{master_addr} -> {resolved}")
        except OSError as e:
            report.add("MASTER_ADDR", "fail", f"{master_addr} does not resolve: {e}")
    world, rank = os.environ.get("WORLD_SIZE"), os.environ.get("RANK")
    if world and rank and not (0 <= int(rank) < int(world)):
        report.add("RANK/WORLD_SIZE", "fail", f"RANK={rank} is outside WORLD_SIZE={world}")


def check_timeout(report: Report, cfg: PipelineConfig) -> None:
    """The collective timeout must outlast the longest pause of one rank (rank 0's export, a slow save)."""
    t = cfg.train.collective_timeout_s
    if t < 300:
        report.add("collective timeout", "warn",
                   f"train.collective_timeout_s={t:g} s: a dead peer is detected fast, but a checkpoint save or "
                   "the final export of a large model can pause one rank longer and would be taken for a failure")
    else:
        report.add("collective timeout", "ok", f"{t:g} s (a silent peer stops the job after this long)")


def serve_handshake(port: int, peers: int, timeout: float, host: str = "0.0.0.0",
                    extra: dict | None = None) -> list[dict]:
    """On rank 0's node: answer `peers` handshakes with our versions (plus `extra`); returns what peers sent."""
    seen: list[dict] = []
    with socket.create_server((host, port), reuse_port=False) as server:
        server.settimeout(timeout)
        deadline = time.time() + timeout
        while len(seen) < peers and time.time() < deadline:
            try:
                conn, addr = server.accept()
            except TimeoutError:
                break
            with conn:
                peer = json.loads(conn.makefile().readline() or "{}")
                conn.sendall((json.dumps({**versions(), **(extra or {})}) + "\n").encode())
                # The peer looks for the marker file before it hangs up: keep the file until then.
                conn.settimeout(10)
                with contextlib.suppress(OSError):
                    conn.recv(1)
                seen.append({"addr": addr[0], **peer})
    return seen


def handshake(master_addr: str, port: int, timeout: float) -> dict:
    """On the other nodes: connect to rank 0's handshake, send our versions, get rank 0's."""
    with socket.create_connection((master_addr, port), timeout=timeout) as conn:
        conn.sendall((json.dumps(versions()) + "\n").encode())
        theirs = json.loads(conn.makefile().readline())
        if theirs.get("checkpoint_marker"):  # checked while rank 0 still holds the file
            theirs["checkpoint_marker_seen"] = Path(theirs["checkpoint_marker"]).is_file()
        return theirs


def check_master(report: Report, master_addr: str, port: int, timeout: float) -> None:
    try:
        theirs = handshake(master_addr, port, timeout)
    except OSError as e:
        report.add("master port", "fail",
                   f"cannot reach {master_addr}:{port} ({e}); is `bertscale doctor --serve` running on rank 0's "
                   "node, and is the port open in the firewall?")
        return
    report.add("master port", "ok", f"{master_addr}:{port} reachable")
    ours = versions()
    diff = {k: (ours[k], theirs.get(k)) for k in ours if theirs.get(k) != ours[k]}
    report.add("versions match rank 0", "fail" if diff else "ok",
               ", ".join(f"{k}: here {a}, rank 0 {b}" for k, (a, b) in diff.items()) or "identical")
    marker = theirs.get("checkpoint_marker")
    if marker:
        shared = bool(theirs.get("checkpoint_marker_seen"))
        report.add("shared checkpoint dir", "ok" if shared else "fail",
                   f"rank 0's {Path(marker).parent} is visible here" if shared else
                   f"rank 0's checkpoint directory {Path(marker).parent} is not visible on this node: every rank "
                   "writes into the same checkpoint directory, so it must be on a shared file system (NFS, "
                   "Lustre, ...) mounted at the same path on every node")


def check_node(report: Report, cfg: PipelineConfig, master_addr: str | None) -> None:
    """The checks every node needs, rank 0's included: versions, disk, timeout, gloo/NCCL environment."""
    v = versions()
    report.add("versions", "ok", ", ".join(f"{k} {val}" for k, val in v.items()))
    report.add("python executable", "ok", sys.executable)
    check_disk(report, cfg)
    check_timeout(report, cfg)
    check_env(report, master_addr)


def run_doctor(cfg: PipelineConfig, master_addr: str | None = None, port: int = 29500,
               timeout: float = 10.0) -> Report:
    report = Report()
    check_node(report, cfg, master_addr)
    if master_addr:
        check_master(report, master_addr, port, timeout)
    return report


def checkpoint_root(cfg: PipelineConfig) -> Path:
    """Where the run's ranks will write checkpoints (the trainer's `<train output>/checkpoints`)."""
    return cfg.stage_dir("train") / "checkpoints"


def serve(port: int, peers: int, timeout: float, checkpoint_dir: str | Path | None = None,
          cfg: PipelineConfig | None = None) -> Report:
    """Rank 0's side. With `checkpoint_dir`, a marker file there lets each peer check it shares the directory;
    with `cfg`, rank 0's own node gets the checks every node gets (disk, timeout, environment) first."""
    report = Report()
    if cfg is not None:
        check_node(report, cfg, os.environ.get("MASTER_ADDR"))
    marker = None
    if checkpoint_dir is not None:
        marker = Path(checkpoint_dir) / f".doctor-{uuid.uuid4().hex[:12]}"
        try:
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text("written by `bertscale doctor --serve`; safe to delete\n")
        except OSError as e:
            report.add("checkpoint dir", "fail", f"cannot write to {marker.parent}: {e.strerror}")
            marker = None
    try:
        seen = serve_handshake(port, peers, timeout, extra={"checkpoint_marker": str(marker)} if marker else None)
    except OSError as e:
        report.add("master port", "fail", f"cannot listen on port {port}: {e} (in use, or not permitted)")
        return report
    finally:
        if marker is not None:
            marker.unlink(missing_ok=True)
    ours = versions()
    report.add("peers", "ok" if len(seen) == peers else "fail", f"{len(seen)} of {peers} peers reached port {port}")
    for peer in seen:
        diff = [k for k in ours if peer.get(k) != ours[k]]
        report.add(f"peer {peer['addr']}", "fail" if diff else "ok",
                   f"versions differ: {diff}" if diff else "versions identical")
    return report


def write_json(report: Report, path: Path) -> None:
    path.write_text(json.dumps([c.__dict__ for c in report.checks], indent=2))
