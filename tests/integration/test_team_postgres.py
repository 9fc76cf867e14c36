"""The README's team set-up on a real PostgreSQL: `mlflow server` and `prefect server start`, each backed by its own
database, the debug pipeline run against both servers by the README's command, and the runs, registered model
versions, aliases and flow runs then read back from PostgreSQL's own tables."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_prefect_deployment import _free_port, _wait_healthy

psycopg = pytest.importorskip("psycopg", reason="the PostgreSQL drivers are the postgres extra: "
                                                  "pip install -e '.[postgres]'")

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PASSWORD = "team-secret"


def _postgres_bindir() -> Path | None:
    """Where initdb and pg_ctl are: on PATH, else Debian's /usr/lib/postgresql/<major>/bin (not on PATH)."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).resolve().parent
    debian = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parent.parent.name)
                    if p.parent.parent.name.isdigit() else 0)
    return debian[-1].parent if debian else None


@dataclass(frozen=True)
class Postgres:
    port: int

    def url(self, database: str, driver: str, user: str = "bertscale") -> str:
        return f"{driver}://{user}:{PASSWORD}@127.0.0.1:{self.port}/{database}"

    def query(self, database: str, sql: str, *params: object) -> list[tuple]:
        with psycopg.connect(self.url(database, "postgresql")) as conn:
            return conn.execute(sql, params).fetchall()


@pytest.fixture()
def postgres() -> Iterator[Postgres]:
    """A throwaway PostgreSQL cluster on a free localhost port, password-authenticated, with the README's role and
    databases: `bertscale`, no superuser, owning `mlflow` and `prefect`. PostgreSQL refuses to run as root, so as
    root (CI) the server runs as Debian's `postgres` account, in a directory it owns."""
    bindir = _postgres_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (initdb/pg_ctl not found; .ci/run installs Debian's postgresql)")
    as_user: list[str] = []
    if os.geteuid() == 0:
        try:
            account = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no `postgres` account for PostgreSQL to run as")
        as_user = ["runuser", "-u", "postgres", "--"]
    # Not under pytest's tmp_path: as root that sits in a 0700 directory the postgres account cannot enter.
    root = Path(tempfile.mkdtemp(prefix="bertscale-pg-"))
    if as_user:
        os.chown(root, account.pw_uid, account.pw_gid)
    (root / "pw").write_text(PASSWORD + "\n")
    data, log, port = root / "data", root / "postgres.log", _free_port()

    def pg(*cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run([*as_user, *cmd], cwd=root, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=120)

    started = False
    try:
        init = pg(str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=scram-sha-256",
                  f"--pwfile={root / 'pw'}", "-E", "UTF8", "--no-sync")
        if init.returncode != 0:
            pytest.skip(f"initdb failed: {init.stderr[-2000:]}")
        # Durability off: a test cluster, thrown away afterwards.
        start = pg(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60", "-o",
                   f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c fsync=off -c synchronous_commit=off",
                   "start")
        started = start.returncode == 0
        if not started:
            pytest.skip(f"PostgreSQL did not start: {start.stderr[-1000:]}\n"
                        f"{log.read_text()[-2000:] if log.exists() else ''}")
        db = Postgres(port)
        # The README's createuser/createdb, as SQL. CREATE DATABASE cannot run inside a transaction.
        with psycopg.connect(db.url("postgres", "postgresql", user="postgres"), autocommit=True) as conn:
            conn.execute(f"CREATE ROLE bertscale LOGIN PASSWORD '{PASSWORD}'")
            conn.execute("CREATE DATABASE mlflow OWNER bertscale")
            conn.execute("CREATE DATABASE prefect OWNER bertscale")
        yield db
    finally:
        if started:
            pg(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop")
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture()
def team_servers(postgres, tmp_path) -> Iterator[tuple[str, str]]:
    """The README's two servers on PostgreSQL; yields (MLflow URL, Prefect API URL)."""
    procs: list = []
    mlflow_port, prefect_port = _free_port(), _free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_SERVER_UI_ENABLED": "false"}
    try:
        # Both start at once (each migrates its empty database), then each is waited for.
        mlflow_cmd = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlflow_port),
                      "--workers", "1", "--backend-store-uri", postgres.url("mlflow", "postgresql+psycopg"),
                      "--artifacts-destination", str(tmp_path / "mlartifacts")]
        prefect_env = {**env, "PREFECT_API_DATABASE_CONNECTION_URL": postgres.url("prefect", "postgresql+asyncpg")}
        prefect_cmd = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)]
        mlflow_url, prefect_url = f"http://127.0.0.1:{mlflow_port}", f"http://127.0.0.1:{prefect_port}/api"
        log_m, log_p = open(tmp_path / "mlflow.log", "w"), open(tmp_path / "prefect.log", "w")
        for cmd, e, log in ((mlflow_cmd, env, log_m), (prefect_cmd, prefect_env, log_p)):
            procs.append((subprocess.Popen(cmd, env=e, stdout=log, stderr=subprocess.STDOUT), log))
        for (proc, log), name, url in zip(procs, ("mlflow server", "prefect server"), (mlflow_url, prefect_url)):
            try:
                _wait_healthy(url, proc)
            except (RuntimeError, TimeoutError) as e:
                log.flush()
                pytest.fail(f"{name} did not become healthy ({e}):\n{Path(log.name).read_text()[-4000:]}")
        yield mlflow_url, prefect_url
    finally:
        for proc, _ in procs:
            proc.terminate()
        for proc, log in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()


def test_pipeline_against_postgres_backed_mlflow_and_prefect(postgres, team_servers, tmp_path, sample_corpus):
    mlflow_url, prefect_url = team_servers
    env = {**os.environ, "PREFECT_API_URL": prefect_url, "PREFECT_HOME": str(tmp_path / "client-home")}
    # The README's client command; a shorter training than the debug config's, still with an evaluation.
    done = subprocess.run(
        [sys.executable, "-m", "bertscale", "pipeline", "--config", str(REPO / "configs" / "debug.yaml"),
         "--workdir", str(tmp_path / "work"), f"--set=corpus.inputs=[{sample_corpus / 'inaugural'}]",
         f"--set=tracking.tracking_uri={mlflow_url}", "--set=train.max_steps=6", "--set=train.eval_every=6",
         "--set=train.checkpoint_every=6", "--set=train.log_every=3"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    # Nothing went to the local store the pipeline uses when no server is configured.
    assert not (tmp_path / "work" / "mlflow.db").exists()

    # MLflow's tables: a finished parent run and a finished run per stage, all in the pipeline's experiment.
    runs = postgres.query("mlflow", """
        SELECT r.run_uuid, r.status, t.value FROM runs r
        JOIN experiments e ON e.experiment_id = r.experiment_id
        JOIN tags t ON t.run_uuid = r.run_uuid AND t.key = 'bertscale.stage'
        WHERE e.name = 'bertscale'""")
    assert sorted((stage, status) for _, status, stage in runs) == [
        (stage, "FINISHED") for stage in
        sorted(["pipeline", "corpus", "tokenizer", "data", "pretrain", "finetune", "finetune-authors"])], runs
    pretrain_run = next(run_id for run_id, _, stage in runs if stage == "pretrain")

    # The registry's tables: the encoder, logged into the pretraining run, and the fine-tuned model, each the
    # champion as the first version of its name.
    versions = postgres.query("mlflow", "SELECT name, version, run_id FROM model_versions ORDER BY name")
    assert [(n, v) for n, v, _ in versions] == [("debug-authors", 1), ("debug-encoder", 1)], versions
    assert {n: r for n, _, r in versions}["debug-encoder"] == pretrain_run
    aliases = set(postgres.query("mlflow", "SELECT name, alias, version FROM registered_model_aliases"))
    assert {("debug-encoder", "champion", 1), ("debug-authors", "champion", 1)} <= aliases, aliases
    # The artifacts went through the server into its --artifacts-destination, not into the database.
    assert list((tmp_path / "mlartifacts").rglob("MLmodel")), "no model artifacts under --artifacts-destination"

    # Prefect's tables: the pipeline flow run completed, and it is the run MLflow's stage runs name.
    flow_runs = postgres.query("prefect", """
        SELECT fr.id::text, fr.state_type FROM flow_run fr JOIN flow f ON f.id = fr.flow_id
        WHERE f.name = 'bertscale-pipeline'""")
    assert [state for _, state in flow_runs] == ["COMPLETED"], flow_runs
    tagged = postgres.query("mlflow", "SELECT DISTINCT value FROM tags WHERE key = 'prefect.flow_run_id'")
    assert {flow_runs[0][0]} == {v for (v,) in tagged}, tagged
    stage_tasks = postgres.query("prefect", "SELECT count(*) FROM task_run WHERE flow_run_id = %s::uuid "
                                            "AND state_type = 'COMPLETED'", flow_runs[0][0])
    assert stage_tasks[0][0] >= 5, stage_tasks
