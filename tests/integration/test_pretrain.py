"""Pretraining end to end with real DeepSpeed ranks on CPU (gloo), our BERT and the real pretraining data.

One tiny data set (Gutenberg paragraphs -> WordPiece -> NSP instances at seq 32 and 64) is built once per
session. Launched jobs use 2 processes; the in-process tests use a single rank.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, trainers
from tokenizers.models import WordPiece

from bertscale.config import PipelineConfig, load_config
from bertscale.errors import BertscaleError

REPO = Path(__file__).resolve().parents[2]
GUTENBERG = REPO / "data" / "sample" / "gutenberg"
SCHEMA = pa.schema([("doc_id", pa.string()), ("text", pa.string()), ("sentences", pa.list_(pa.string())),
                    ("source", pa.string()), ("metadata", pa.string())])
# A model small enough for 2 shared cores: L2/H64, sequences of 32 then 64 tokens.
TINY = ["tracking.enabled=false", "model.hidden_size=64", "model.intermediate_size=128",
        "model.num_attention_heads=2", "model.max_position_embeddings=64", "data.seq_lengths=[32,64]",
        "train.micro_batch_size=8", "train.warmup_steps=2", "train.lr=1e-3", "train.log_every=4",
        "train.eval_batches=2", "train.precision=fp32"]


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    """corpus/ + tokenizer/ written directly, data/ built by the real data stage."""
    from bertscale.data import build_pretraining_data

    root = tmp_path_factory.mktemp("pretrain")
    paras = [" ".join(p.split()) for f in sorted(GUTENBERG.glob("*.txt"))
             for p in f.read_text(errors="replace").split("\n\n") if len(p.strip()) >= 150][:400]
    rows = [{"doc_id": f"g{i:04d}", "text": p, "sentences": [s for s in re.split(r"(?<=[.!?;])\s+", p) if s],
             "source": "test", "metadata": "{}"} for i, p in enumerate(paras)]
    (root / "corpus" / "shards").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), root / "corpus" / "shards" / "part-00000.parquet")
    (root / "corpus" / "manifest.json").write_text(json.dumps({"shards": [
        {"name": "shards/part-00000.parquet", "rows": len(rows), "bytes": 0, "sha256": ""}], "counts": {},
        "config": {}}))
    tok = Tokenizer(WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(paras, trainers.WordPieceTrainer(
        vocab_size=1000, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], limit_alphabet=60))
    (root / "tokenizer").mkdir()
    tok.save(str(root / "tokenizer" / "tokenizer.json"))
    cfg = PipelineConfig.model_validate({"workdir": str(root), "data": {"num_proc": 1, "seq_lengths": [32, 64],
                                                                        "heldout_fraction": 0.05}})
    build_pretraining_data(cfg)
    return root


def config(workdir: Path, out: Path, *overrides: str) -> PipelineConfig:
    return load_config(None, [f"workdir={workdir}", f"train.output={out}", *TINY, *overrides])


def steps(out: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (out / "steps.jsonl").read_text().splitlines())}


@pytest.fixture()
def clean_env(monkeypatch):
    """In-process runs export RANK/MASTER_PORT & co.; keep them from leaking into later launches."""
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def _free_port() -> int:
    from bertscale.train.distributed import read_env

    return read_env({}).master_port


def _launch_argv(cfg: PipelineConfig, num_procs: int = 2) -> list[str]:
    from bertscale.train.launch import LaunchSpec, build_command, write_config

    cmd, _ = build_command(LaunchSpec(num_procs=num_procs, master_port=_free_port()), write_config(cfg))
    return cmd


# ----------------------------------------------------------------------------------------------------------------
# 2 processes via the DeepSpeed launcher
# ----------------------------------------------------------------------------------------------------------------
RESUME_RUN = ["model.hidden_size=128", "model.intermediate_size=256", "train.micro_batch_size=32",
              "train.max_steps=14", "train.phase_steps=[7,7]", "train.checkpoint_every=4", "train.eval_every=7",
              "train.zero_stage=2", "train.precision=bf16", "train.compile=true"]


@pytest.fixture(scope="module")
def reference_run(workdir) -> Path:
    """Two ranks, ZeRO-2, bf16, compiled, both phases, uninterrupted: `bertscale.train.launch` end to end."""
    from bertscale.train.launch import LaunchSpec, launch

    out = workdir / "train-reference"
    cfg = config(workdir, out, *RESUME_RUN)
    assert launch(cfg, LaunchSpec(num_procs=2, master_port=_free_port())) == 0
    return out


def test_two_ranks_zero2_end_to_end(reference_run):
    records = steps(reference_run)
    assert sorted(records) == list(range(1, 15))
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records.values())
    assert records[1]["lr"] == pytest.approx(5e-4)  # warmup: (0 + 1) / 2 of the peak
    result = json.loads((reference_run / "train_result.json").read_text())
    assert result["final_step"] == 14 and result["stopped"] == "completed" and result["skipped_steps"] == 0
    assert 0 < result["metrics"]["mlm_acc"] <= 1 and "eval_mlm_loss" in result["metrics"]
    assert result["tokens_per_s"] > 0
    # Keep-last-3 of the checkpoints at 4, 8, 12 and the final one at 14.
    tags = sorted(p.name for p in (reference_run / "checkpoints").glob("step*"))
    assert tags == ["step00000008", "step00000012", "step00000014"]
    rank_files = sorted((reference_run / "checkpoints" / "step00000014").glob("rank_*.pt"))
    assert len(rank_files) == 2
    # Both phases ran: 7 steps x 32 sequences from the seq-32 loader, then 7 x 32 from the seq-64 one.
    loaders = torch.load(rank_files[0], weights_only=False)["loaders"]
    assert [(s["epoch"], s["position"]) for s in loaders] == [(0, 7 * 32), (0, 7 * 32)]
    hf = reference_run / "hf"
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (hf / name).is_file(), name


def test_sigkill_and_resume_reproduces_every_step(workdir, reference_run):
    out = workdir / "train-killed"
    argv = _launch_argv(config(workdir, out, *RESUME_RUN))
    proc = subprocess.Popen(argv, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    # Kill the whole job (launcher and ranks) once it is past its step-4 checkpoint and mid-way to step 8.
    while time.monotonic() < deadline and proc.poll() is None:
        log = out / "steps.jsonl"
        if log.is_file() and len(log.read_text().splitlines()) >= 6:
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    killed_at = max(steps(out))
    assert proc.returncode == -signal.SIGKILL and killed_at < 14, "the job finished before it could be killed"
    resumed = subprocess.run(_launch_argv(config(workdir, out, *RESUME_RUN)), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout + resumed.stderr
    ref, got = steps(reference_run), steps(out)
    assert sorted(got) == sorted(ref)
    for s in ref:
        assert got[s]["loss"] == pytest.approx(ref[s]["loss"], abs=1e-6), f"step {s} (killed at {killed_at})"


LAUNCH_SCRIPT = textwrap.dedent("""
    import sys
    from bertscale.config import load_config
    from bertscale.train.launch import LaunchSpec, launch
    sys.exit(launch(load_config(None, sys.argv[2:]), LaunchSpec(num_procs=2, master_port=int(sys.argv[1]))))
""")


def test_sigterm_to_the_launcher_checkpoints_every_rank(workdir, tmp_path):
    out = tmp_path / "terminated"
    args = [f"workdir={workdir}", f"train.output={out}", *TINY, "train.max_steps=100000",
            "train.checkpoint_every=100000", "train.eval_every=100000"]
    proc = subprocess.Popen([sys.executable, "-c", LAUNCH_SCRIPT, str(_free_port()), *args], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not ((out / "steps.jsonl").is_file() and len(steps(out)) >= 3):
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) != 0  # stopped, not finished
    tag = (out / "checkpoints" / "latest").read_text().strip()
    assert int(tag.removeprefix("step")) >= 3
    assert sorted(p.name for p in (out / "checkpoints" / tag).glob("rank_*.pt")) == ["rank_0.pt", "rank_1.pt"]
    assert not (out / "hf").exists()


# ----------------------------------------------------------------------------------------------------------------
# ZeRO stages 0-3 (2 ranks, fp32): the same trajectory and the same exported weights
# ----------------------------------------------------------------------------------------------------------------
STAGES_SCRIPT = textwrap.dedent("""
    import sys
    from bertscale.config import load_config
    from bertscale.train import pretrain
    base = sys.argv[1:]
    for stage in (0, 1, 2, 3):
        out = [a for a in base if a.startswith("workdir=")][0].split("=", 1)[1] + f"/zero{stage}"
        pretrain(load_config(None, base + [f"train.zero_stage={stage}", f"train.output={out}"]))
""")


@pytest.fixture(scope="module")
def stage_runs(workdir, tmp_path_factory) -> Path:
    """Four runs, one per ZeRO stage, inside one 2-rank torchrun job (one start-up for all four)."""
    root = tmp_path_factory.mktemp("stages")
    script = root / "stages.py"
    script.write_text(STAGES_SCRIPT)
    args = [f"workdir={root}", f"train.output={root}/unused", *TINY, "train.max_steps=6", "train.eval_every=6",
            "train.checkpoint_every=6", f"data.output={workdir / 'data'}", f"tokenizer.output={workdir / 'tokenizer'}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), str(script), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    return root


def test_zero_stages_follow_the_same_loss_trajectory(stage_runs):
    runs = {s: steps(stage_runs / f"zero{s}") for s in range(4)}
    assert all(sorted(r) == list(range(1, 7)) for r in runs.values())
    for s in (1, 2, 3):
        for step, rec in runs[0].items():
            assert runs[s][step]["loss"] == pytest.approx(rec["loss"], rel=1e-4), f"zero{s} step {step}"
            assert runs[s][step]["grad_norm"] == pytest.approx(rec["grad_norm"], rel=1e-3), f"zero{s} {step}"


def test_zero_shards_consolidate_to_the_same_weights(stage_runs):
    from safetensors.torch import load_file

    ref = load_file(stage_runs / "zero0" / "hf" / "model.safetensors")
    for s in (2, 3):
        got = load_file(stage_runs / f"zero{s}" / "hf" / "model.safetensors")
        assert sorted(got) == sorted(ref)
        for k in ref:
            assert torch.allclose(got[k], ref[k], atol=1e-5), f"zero{s} {k}"


# ----------------------------------------------------------------------------------------------------------------
# In-process, one rank
# ----------------------------------------------------------------------------------------------------------------
def test_nonfinite_losses_are_skipped_then_abort(workdir, tmp_path, clean_env, monkeypatch):
    from bertscale.train import loop, pretrain

    real_forward = loop.forward
    calls = {"n": 0}

    def flaky_forward(eng, batch):
        out = real_forward(eng, batch)
        calls["n"] += 1
        if calls["n"] in (3, 4):  # two bad micro batches in a row, then recovery
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(loop, "forward", flaky_forward)
    threads = set(threading.enumerate())
    result = pretrain(config(workdir, tmp_path / "nan", "train.max_steps=5", "train.max_bad_steps=3",
                             "train.zero_stage=1"))
    assert result.final_step == 5 and result.skipped_steps == 2
    assert_left_as_found(threads)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in steps(tmp_path / "nan").values())

    def always_nan(eng, batch):
        out = real_forward(eng, batch)
        out.loss = out.loss * float("inf")
        return out

    monkeypatch.setattr(loop, "forward", always_nan)
    with pytest.raises(BertscaleError, match="3 consecutive non-finite losses"):
        pretrain(config(workdir, tmp_path / "diverged", "train.max_steps=5", "train.max_bad_steps=3"))
    assert_left_as_found(threads)


def assert_left_as_found(threads_before: set[threading.Thread]) -> None:
    """No process group, no launcher variable and no non-daemon thread survives an in-process run."""
    import torch.distributed as dist

    assert not dist.is_initialized()
    assert not [k for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT") if k in os.environ]
    assert not [t.name for t in threading.enumerate() if t not in threads_before and not t.daemon]


def test_sigterm_checkpoints_and_stops(workdir, tmp_path, clean_env, monkeypatch):
    from bertscale.train import loop, pretrain

    real_forward = loop.forward
    calls = {"n": 0}

    def terminated_forward(eng, batch):
        calls["n"] += 1
        if calls["n"] == 3 and eng.training:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_forward(eng, batch)

    monkeypatch.setattr(loop, "forward", terminated_forward)
    out = tmp_path / "term"
    result = pretrain(config(workdir, out, "train.max_steps=50", "train.checkpoint_every=100",
                             "train.zero_stage=0"))
    assert result.stopped == "signal" and result.final_step == 3 and result.hf_dir is None
    assert (out / "checkpoints" / "latest").read_text().strip() == "step00000003"


def test_a_fresh_run_sets_old_checkpoints_aside_and_a_changed_stage_is_refused(workdir, tmp_path, clean_env):
    from bertscale.errors import ConfigError
    from bertscale.train import pretrain

    out = tmp_path / "rerun"
    assert pretrain(config(workdir, out, "train.max_steps=4", "train.eval_every=4", "train.zero_stage=0")
                    ).final_step == 4
    with pytest.raises(ConfigError, match="written with train.zero_stage=0, this run has train.zero_stage=1"):
        pretrain(config(workdir, out, "train.max_steps=6", "train.zero_stage=1"))
    result = pretrain(config(workdir, out, "train.max_steps=2", "train.eval_every=2", "train.zero_stage=0",
                             "train.resume=false"))
    assert result.final_step == 2 and sorted(steps(out)) == [1, 2]
    ckpts = out / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step00000002"
    assert sorted(p.name for p in ckpts.glob("step*")) == ["step00000002"]
    (archive,) = ckpts.glob("previous-*")
    assert (archive / "step00000004").is_dir()


def test_init_from_starts_a_new_run_from_earlier_weights(workdir, tmp_path, clean_env):
    from safetensors.torch import load_file

    from bertscale.errors import ConfigError
    from bertscale.train import pretrain

    first = pretrain(config(workdir, tmp_path / "first", "train.max_steps=3", "train.eval_every=3",
                            "train.zero_stage=0"))
    # A learning rate too small to move the weights: the second run's export is its initial weights.
    still = ["train.max_steps=1", "train.eval_every=1", "train.zero_stage=0", "train.lr=1e-12",
             "train.warmup_steps=0", "train.seed=7"]
    warm = pretrain(config(workdir, tmp_path / "warm", f"train.init_from={first.hf_dir}", *still))
    cold = pretrain(config(workdir, tmp_path / "cold", *still))
    before = load_file(Path(first.hf_dir) / "model.safetensors")
    key = "bert.encoder.layer.0.attention.self.query.weight"
    assert torch.allclose(load_file(Path(warm.hf_dir) / "model.safetensors")[key], before[key], atol=1e-6)
    assert not torch.allclose(load_file(Path(cold.hf_dir) / "model.safetensors")[key], before[key], atol=1e-3)
    with pytest.raises(ConfigError, match="train.init_from=.*does not exist"):
        pretrain(config(workdir, tmp_path / "bad", f"train.init_from={tmp_path / 'nowhere'}", *still))


def test_rank0_logs_metrics_into_the_mlflow_run_named_by_the_env(workdir, tmp_path, clean_env, monkeypatch):
    from bertscale import tracking
    from bertscale.train import pretrain

    cfg = config(workdir, tmp_path / "tracked", "tracking.enabled=true", f"tracking.tracking_uri=sqlite:///"
                 f"{tmp_path / 'mlflow.db'}", "train.max_steps=4", "train.eval_every=4", "train.zero_stage=0")
    run_id = tracking.create_run(cfg, "pretrain")
    monkeypatch.setenv("BERTSCALE_MLFLOW_RUN_ID", run_id)
    pretrain(cfg)
    metrics, tags = tracking.run_data(run_id)
    for key in ("train/loss", "train/mlm_acc", "train/nsp_acc", "train/lr", "train/grad_norm",
                "train/tokens_per_s", "train/sequences_per_s", "eval/mlm_loss", "eval/mlm_acc", "eval/nsp_acc"):
        assert key in metrics, key
    assert tags["pretrain.world_size"] == "1" and tags["pretrain.zero_stage"] == "0"


# ----------------------------------------------------------------------------------------------------------------
# Export -> transformers
# ----------------------------------------------------------------------------------------------------------------
def test_export_loads_in_transformers_with_equal_logits(reference_run):
    transformers = pytest.importorskip("transformers")
    from bertscale.model import BertConfig, BertForPreTraining
    from bertscale.model.weights import MODEL_CONFIG, consolidated_state_dict, locate_checkpoint

    root, tag = locate_checkpoint(reference_run)
    ours = BertForPreTraining(BertConfig.from_dict(json.loads((root / tag / MODEL_CONFIG).read_text())))
    ours.load_state_dict(consolidated_state_dict(root, tag), strict=False)
    theirs, info = transformers.BertForPreTraining.from_pretrained(reference_run / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ours.eval(), theirs.eval()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, ours.config.vocab_size, (2, 24), generator=gen)
    types = torch.cat([torch.zeros(2, 12), torch.ones(2, 12)], 1).long()
    mask = torch.ones_like(ids)
    mask[1, 20:] = 0
    with torch.no_grad():
        mine = ours(ids, types, mask)
        ref = theirs(input_ids=ids, token_type_ids=types, attention_mask=mask)
    real = mask.bool()
    assert torch.allclose(mine.mlm_logits[real], ref.prediction_logits[real], atol=1e-4)
    assert torch.allclose(mine.nsp_logits, ref.seq_relationship_logits, atol=1e-4)


def test_lamb_trains_with_zero_stage_0(workdir, tmp_path, clean_env):
    from bertscale.train import pretrain

    out = tmp_path / "lamb"
    result = pretrain(config(workdir, out, "train.optimizer=lamb", "train.zero_stage=0", "train.max_steps=3",
                             "train.eval_every=3", "train.weight_decay=0.0"))
    records = steps(out)
    assert result.final_step == 3 and sorted(records) == [1, 2, 3]
    assert all(r["grad_norm"] > 0 and torch.isfinite(torch.tensor(r["loss"])) for r in records.values())
