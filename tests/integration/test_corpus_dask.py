"""The corpus stage on a real dask.distributed cluster (Beam's DaskRunner): a scheduler and two workers started as
separate processes, on localhost and across two network-namespace hosts. The shards must be byte-identical to
the local runner's; a worker killed mid-run either lets the engine finish with the same output or fails the
stage with a clear error, never a manifest over partial output."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("distributed", reason="the Dask runner needs the dask extra: pip install 'apache-beam[dask]'")

from bertscale.config import load_config  # noqa: E402
from bertscale.corpus import run_corpus  # noqa: E402
from bertscale.train.distributed import free_port  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from netns import Host, TwoHosts, require_netns  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("BERTSCALE_SHARED_DATA", REPO.parent / "shared" / "data"))
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def inputs() -> list[str]:
    wiki, books = SHARED / "corpus" / "wikipedia", SHARED / "corpus" / "gutenberg" / "inaugural"
    if not wiki.is_dir() or not books.is_dir():
        pytest.skip(f"shared corpus not found under {SHARED}; set BERTSCALE_SHARED_DATA")
    return [str(wiki / "wiki_0[0-1]"), str(books)]


def overrides(root: Path, *extra: str) -> list[str]:
    return [f"workdir={root}", "tracking.enabled=false", "corpus.target_shard_bytes=1048576",
            "corpus.bundle_bytes=262144", *extra]


def dask_overrides(root: Path, address: str) -> list[str]:
    return overrides(root, "corpus.runner.runner=DaskRunner",
                     f"corpus.runner.pipeline_options=[--dask_client_address={address}]")


def shards(out: Path) -> dict[str, bytes]:
    manifest = json.loads((out / "manifest.json").read_text())
    return {s["name"]: (out / s["name"]).read_bytes() for s in manifest["shards"]}


def wait_for_workers(address: str, n: int, timeout: float = 90.0) -> None:
    from distributed import Client

    with Client(address, timeout="30s") as client:
        client.wait_for_workers(n, timeout=timeout)


@contextlib.contextmanager
def local_cluster(tmp: Path, workers: int = 2) -> Iterator[tuple[str, list[subprocess.Popen]]]:
    """`dask scheduler` and `dask worker`s as separate processes on 127.0.0.1; all killed on exit."""
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    procs = [subprocess.Popen([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                               "--no-dashboard"], stdout=open(tmp / "scheduler.log", "w"), stderr=subprocess.STDOUT)]
    try:
        for i in range(workers):
            procs.append(subprocess.Popen(
                [str(BIN / "dask"), "worker", address, "--nthreads", "1", "--nworkers", "1", "--no-dashboard",
                 "--name", f"w{i}"], stdout=open(tmp / f"worker{i}.log", "w"), stderr=subprocess.STDOUT))
        wait_for_workers(address, workers)
        yield address, procs
    finally:
        for p in reversed(procs):
            p.kill()
            p.wait(timeout=30)


@pytest.fixture(scope="module")
def direct(inputs, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("direct")
    result = run_corpus(load_config(None, overrides(root, "corpus.runner.num_workers=2"),
                                    extra={"corpus": {"inputs": inputs}}))
    return result.output_dir


def test_dask_cluster_writes_the_direct_runners_shards(inputs, direct, tmp_path):
    with local_cluster(tmp_path) as (address, _):
        result = run_corpus(load_config(None, dask_overrides(tmp_path / "work", address),
                                        extra={"corpus": {"inputs": inputs}}))
    c = result.counts
    assert c["read"] == c["kept"] + c["filtered"] + c["duplicates"] + c["quarantined"]
    got, want = shards(result.output_dir), shards(direct)
    assert len(want) > 1 and sorted(got) == sorted(want)
    assert all(got[name] == want[name] for name in want), "Dask and DirectRunner shards differ"


def test_dask_workers_read_the_decontamination_index_from_the_work_dir(inputs, shared_data, tmp_path):
    """The eval n-gram index is built by the launcher and read by each worker from the work directory: a planted
    QNLI dev sentence is removed and reported on the cluster exactly as by the local runner."""
    qnli = shared_data / "glue" / "QNLI" / "dev.tsv"
    sentence = qnli.read_text(encoding="utf-8").splitlines()[7].split("\t")[2]
    book = (shared_data / "corpus" / "gutenberg" / "gutenberg" / "chesterton-brown.txt").read_text(encoding="utf-8")
    (tmp_path / "planted").mkdir()
    (tmp_path / "planted" / "quote.jsonl").write_text(json.dumps({"text": f"{book[5000:8000]} {sentence}"}) + "\n")
    files = [*inputs, str(tmp_path / "planted")]
    eval_file = (f"corpus.decontamination.eval_files=[{{task: QNLI, path: {qnli}, format: glue-tsv, "
                 "text_columns: [1, 2]}]")
    local = run_corpus(load_config(None, overrides(tmp_path / "direct", eval_file, "corpus.runner.num_workers=2"),
                                   extra={"corpus": {"inputs": files}}))
    with local_cluster(tmp_path) as (address, _):
        result = run_corpus(load_config(None, [*dask_overrides(tmp_path / "work", address), eval_file],
                                        extra={"corpus": {"inputs": files}}))
    report = (result.output_dir / "decontamination.jsonl").read_text()
    assert '"task": "QNLI"' in report and "planted/quote.jsonl" in report
    assert result.counts["decontaminated"] == local.counts["decontaminated"] >= 1
    assert report == (local.output_dir / "decontamination.jsonl").read_text()
    assert shards(result.output_dir) == shards(local.output_dir)


def test_a_worker_killed_mid_run_never_leaves_a_complete_looking_output(inputs, direct, tmp_path):
    from distributed import Client

    with local_cluster(tmp_path) as (address, procs):
        out = tmp_path / "work" / "corpus"
        cmd = [str(BIN / "bertscale"), "corpus", "--no-tracking", "--workdir", str(tmp_path / "work"),
               *inputs, "--set", "corpus.target_shard_bytes=1048576", "--set", "corpus.bundle_bytes=262144",
               "--runner", "DaskRunner", f"--pipeline-option=--dask_client_address={address}"]
        run = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
        with Client(address, timeout="30s") as client:
            deadline = time.monotonic() + 120
            while not any(client.processing().values()) and time.monotonic() < deadline and run.poll() is None:
                time.sleep(0.05)
            procs[1].kill()  # worker w0: the engine loses its tasks and in-memory results
        output, _ = run.communicate(timeout=600)
    print(f"\nworker killed mid-run: exit {run.returncode}, last line: {output.strip().splitlines()[-1][:300]}")
    if run.returncode == 0:
        assert shards(out) == shards(direct), output[-2000:]
    else:
        assert not (out / "manifest.json").exists(), "a failed run left a manifest"
        assert "Traceback" not in output, output[-3000:]
        assert output.strip().splitlines()[-1].startswith("error:"), output[-2000:]


def test_scheduler_and_workers_on_two_hosts(inputs, direct, tmp_path):
    """Scheduler and one worker on host a, one worker on host b; the stage is launched from host a."""
    require_netns()
    with TwoHosts() as (a, b):
        port = 8786
        address = f"tcp://{a.address}:{port}"
        a.popen([str(BIN / "dask"), "scheduler", "--host", a.address, "--port", str(port), "--no-dashboard"],
                log=tmp_path / "scheduler.log")
        _start_worker(a, address, "wa", tmp_path)
        _start_worker(b, address, "wb", tmp_path)
        probe = a.popen([sys.executable, "-c", f"from distributed import Client; c = Client('{address}', "
                         "timeout='60s'); c.wait_for_workers(2, timeout=90); "
                         "print(sorted(w['host'] for w in c.scheduler_info()['workers'].values()))"],
                        log=tmp_path / "probe.log")
        assert probe.wait(timeout=120) == 0, (tmp_path / "probe.log").read_text()
        assert sorted([a.address, b.address]) == sorted(eval((tmp_path / "probe.log").read_text().splitlines()[-1]))
        run = a.popen([str(BIN / "bertscale"), "corpus", "--no-tracking", "--workdir", str(tmp_path / "work"),
                       *inputs, "--set", "corpus.target_shard_bytes=1048576",
                       "--set", "corpus.bundle_bytes=262144", "--runner", "DaskRunner",
                       f"--pipeline-option=--dask_client_address={address}"], log=tmp_path / "run.log", cwd=REPO)
        assert run.wait(timeout=600) == 0, (tmp_path / "run.log").read_text()[-3000:]
    assert shards(tmp_path / "work" / "corpus") == shards(direct)


def _start_worker(host: Host, address: str, name: str, tmp: Path) -> None:
    host.popen([str(BIN / "dask"), "worker", address, "--host", host.address, "--nthreads", "1", "--nworkers", "1",
                "--no-dashboard", "--name", name], log=tmp / f"{name}.log")


# A dask worker (no nanny, so this process is the worker) that cannot import the installed bertscale: its import
# system finds `bertscale` only in a zip under the worker's own directory, i.e. a copy uploaded to it.
_WORKER_WITHOUT_BERTSCALE = """
import importlib.machinery, sys

SCRATCH = sys.argv[3]


class UploadedOnly:
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name != "bertscale":
            return None
        uploaded = [p for p in sys.path if p.startswith(SCRATCH) and p.endswith(".zip")]
        spec = importlib.machinery.PathFinder.find_spec(name, uploaded)
        if spec is None:
            raise ModuleNotFoundError("No module named 'bertscale' (hidden on this worker)", name=name)
        return spec


sys.meta_path.insert(0, UploadedOnly)
sys.argv = ["dask-worker", sys.argv[1], "--name", sys.argv[2], "--local-directory", SCRATCH, "--no-nanny",
            "--nthreads", "1", "--no-dashboard"]
from distributed.cli.dask_worker import main

main()
"""


def test_workers_without_bertscale_get_this_package_uploaded(inputs, direct, tmp_path):
    from distributed import Client

    # Defined here, not at module level: the workers cannot import this test module, so these travel by value.
    def _import_error() -> str | None:
        try:
            import bertscale  # noqa: F401
        except ImportError as err:
            return type(err).__name__
        return None

    def _bertscale_file() -> str:
        import bertscale

        return bertscale.__file__

    script = tmp_path / "worker_without_bertscale.py"
    script.write_text(_WORKER_WITHOUT_BERTSCALE)
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    procs = [subprocess.Popen([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                               "--no-dashboard"], stdout=open(tmp_path / "scheduler.log", "w"),
                              stderr=subprocess.STDOUT)]
    try:
        for i in range(2):
            scratch = tmp_path / f"scratch{i}"
            scratch.mkdir()
            procs.append(subprocess.Popen([sys.executable, str(script), address, f"bare{i}", str(scratch)],
                                          cwd=tmp_path, stdout=open(tmp_path / f"bare{i}.log", "w"),
                                          stderr=subprocess.STDOUT))
        wait_for_workers(address, 2)
        with Client(address, timeout="30s") as client:  # the premise: these workers cannot import bertscale
            assert set(client.run(_import_error).values()) == {"ModuleNotFoundError"}
        result = run_corpus(load_config(None, dask_overrides(tmp_path / "work", address),
                                        extra={"corpus": {"inputs": inputs}}))
        with Client(address, timeout="30s") as client:
            where = client.run(_bertscale_file)
    finally:
        for p in reversed(procs):
            p.kill()
            p.wait(timeout=30)
    assert all(f.startswith(str(tmp_path / "scratch")) and ".zip" in f for f in where.values()), where
    assert shards(result.output_dir) == shards(direct)

