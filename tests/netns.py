"""Two "hosts" on one machine for multi-node tests: Linux network namespaces joined by a veth pair.

Each host is a namespace with its own interface and address (10.<a>.<b>.1 and .2/24), so ranks in different
namespaces talk over real TCP through the veth, and the link can be cut (`ip link set ... down`) like a pulled
cable. Needs root and a working `ip netns`; `require_netns()` skips the test with the reason otherwise.
Names and subnets are derived from the process id and a counter, so tests (and parallel test sessions) never
collide; `TwoHosts` always tears down in its `__exit__`, also after a failed test.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

_COUNTER = itertools.count()


def _ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = ["ip", "netns", "exec", ns, "ip", *args] if ns else ["ip", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.strip()}")
    return done


def require_netns() -> None:
    """Skip the calling test unless namespaces can be created here (root, iproute2, kernel support)."""
    if os.geteuid() != 0:
        pytest.skip("multi-host tests need root to create network namespaces (ip netns)")
    if shutil.which("ip") is None:
        pytest.skip("iproute2's `ip` is not installed")
    probe = f"bsprobe{os.getpid() % 100000}"
    done = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"`ip netns add` fails here: {done.stderr.strip()}")
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)


@dataclass
class Host:
    """One namespace: its name, the veth inside it and that interface's address."""

    ns: str
    ifname: str
    address: str
    procs: list[subprocess.Popen] = field(default_factory=list)

    def env(self) -> dict[str, str]:
        """Variables that make gloo (and NCCL) use this host's veth."""
        return {"GLOO_SOCKET_IFNAME": self.ifname, "NCCL_SOCKET_IFNAME": self.ifname}

    def popen(self, argv: Sequence[str], env: Mapping[str, str] | None = None, log: Path | None = None,
              cwd: str | Path | None = None) -> subprocess.Popen:
        """Start `argv` inside this host (its own process group, so it can be killed whole)."""
        out = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(["ip", "netns", "exec", self.ns, *argv], env={**os.environ, **self.env(), **(env or {})},
                                stdout=out, stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True)
        self.procs.append(proc)
        return proc

    def link(self, up: bool) -> None:
        """Plug or pull this host's cable (the peer's end loses its carrier too)."""
        _ip("link", "set", self.ifname, "up" if up else "down", ns=self.ns)

    def kill_all(self) -> None:
        """Kill every process started here and all their descendants (launchers put ranks in new sessions)."""
        import psutil

        for proc in self.procs:
            try:
                family = psutil.Process(proc.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                family = []
            for p in family:
                with contextlib.suppress(psutil.NoSuchProcess):
                    p.kill()
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)


class TwoHosts:
    """`with TwoHosts() as (a, b):` two namespaces on one /24, torn down (processes included) on exit."""

    def __init__(self) -> None:
        n = next(_COUNTER)
        tag = f"{os.getpid() % 10000}x{n}"
        subnet = f"10.{200 + (os.getpid() // 250) % 50}.{(os.getpid() + n) % 250}"
        self.hosts = [Host(f"bs{tag}{side}", f"v{tag}{side}", f"{subnet}.{i + 1}") for i, side in enumerate("ab")]

    def __enter__(self) -> tuple[Host, Host]:
        a, b = self.hosts
        try:
            for h in self.hosts:
                _ip("netns", "add", h.ns)
                _ip("link", "set", "lo", "up", ns=h.ns)
            _ip("link", "add", a.ifname, "type", "veth", "peer", "name", b.ifname)
            for h in self.hosts:
                _ip("link", "set", h.ifname, "netns", h.ns)
                _ip("addr", "add", f"{h.address}/24", "dev", h.ifname, ns=h.ns)
                _ip("link", "set", h.ifname, "up", ns=h.ns)
            wait_reachable(a, b.address)
        except BaseException:
            self.__exit__()
            raise
        return a, b

    def __exit__(self, *exc: object) -> None:
        for h in self.hosts:
            h.kill_all()
        for h in self.hosts:  # deleting a namespace deletes its end of the veth, and so the pair
            subprocess.run(["ip", "netns", "del", h.ns], capture_output=True)


def wait_reachable(host: Host, address: str, timeout: float = 10.0) -> None:
    """Wait until `host` has a route to `address` (addresses need a moment to become usable)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = _ip("route", "get", address, ns=host.ns, check=False)
        if done.returncode == 0 and "dev" in done.stdout:
            return
        time.sleep(0.1)
    raise RuntimeError(f"{host.ns} has no route to {address}")
