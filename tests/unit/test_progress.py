"""Progress on every long stage: one decision for every bar (the main process only, rate-limited off a terminal,
off with BERTSCALE_PROGRESS=0), and each stage's bar with its counts."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bertscale import progress
from bertscale.config import PipelineConfig, TokenizerConfig, load_config
from bertscale.corpus.pipeline import StagePlan, UnitProgress, run_plain
from bertscale.data import build_pretraining_data
from bertscale.finetune.tasks import Hparams
from bertscale.finetune.trainer import finetune_task
from bertscale.progress import progress_bar, progress_enabled
from bertscale.tokenizer import CorpusStream, save_tokenizer, train_wordpiece
from bertscale.train.distributed import DistEnv
from bertscale.train.metrics import MetricsSink
from conftest import make_keyword_task


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def draws(text: str) -> list[str]:
    """What a terminal would have shown, one entry per redraw."""
    return [d.strip() for d in text.split("\r") if d.strip()]


def test_off_a_terminal_a_bar_draws_only_every_30_s(monkeypatch):
    monkeypatch.delenv(progress.SWITCH, raising=False)
    out = io.StringIO()
    with progress_bar(1000, "work", "item", stream=out) as bar:
        for _ in range(1000):
            bar.update(1)
    assert bar.mininterval == 30.0
    shown = draws(out.getvalue())
    assert len(shown) == 2 and shown[0].startswith("work:   0%") and "1000/1000" in shown[1]
    assert progress_bar(3, "work", "item", stream=Terminal()).mininterval == 1.0


def test_bars_are_off_on_other_ranks_in_pool_workers_and_when_switched_off(monkeypatch):
    monkeypatch.delenv(progress.SWITCH, raising=False)
    assert progress_enabled() and progress_enabled(is_main=True) and not progress_enabled(is_main=False)
    for kwargs in ({"is_main": False}, {"enabled": False}):
        out = io.StringIO()
        with progress_bar(5, "work", "item", stream=out, **kwargs) as bar:
            bar.update(5)
        assert out.getvalue() == ""
    monkeypatch.setattr(progress.multiprocessing, "parent_process", lambda: object())  # a spawned worker
    assert not progress_enabled() and progress_enabled(is_main=True)
    monkeypatch.undo()
    monkeypatch.setenv(progress.SWITCH, "0")
    out = io.StringIO()
    with progress_bar(5, "work", "item", stream=out, is_main=True) as bar:
        bar.update(5)
    assert out.getvalue() == "" and not progress_enabled(is_main=True)


def test_log_records_go_above_a_bar_on_a_terminal(monkeypatch):
    monkeypatch.delenv(progress.SWITCH, raising=False)
    screen = Terminal()
    monkeypatch.setattr(progress.sys, "stderr", screen)
    console = logging.StreamHandler(screen)  # on stderr, as `logging.basicConfig` makes it
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [console])
    with progress_bar(2, "work", "item") as bar, progress.logs_above(bar):
        bar.update(1)
        logging.getLogger("bertscale.test").warning("shard 1/2 built")
        bar.update(1)
    assert root.handlers == [console]
    # What the terminal shows: the record on a line of its own (the bar was cleared before it), the bar below.
    shown = [line.split("\r")[-1] for line in screen.getvalue().split("\n")]
    assert shown[0] == "shard 1/2 built" and shown[1].startswith("work: 100%") and "2/2" in shown[1]


def test_pretraining_bar_on_rank_0_only(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(progress.SWITCH, raising=False)
    other = MetricsSink(tmp_path, DistEnv(rank=1, world_size=2), 0, 3)
    assert other.bar is None
    sink = MetricsSink(tmp_path, DistEnv(), 0, 3)
    for step in (1, 2, 3):
        sink.step(step, {"loss": 1.0})
    sink.close()
    assert "3/3" in draws(capsys.readouterr().err)[-1]


def test_finetuning_shows_steps_loss_and_eta(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(progress.SWITCH, raising=False)
    task, ckpt = make_keyword_task(tmp_path, ["a", "b", "c"], k=4, rows=48)
    hp = Hparams(lr=1e-3, batch_size=16, epochs=2, max_length=16)
    finetune_task("yesno", ckpt, ckpt, hp, seed=1, custom_tasks=[task], precision="fp32")
    shown = draws(capsys.readouterr().err)
    last = shown[-1]
    assert last.startswith("finetune yesno seed 1: 100%") and "6/6" in last and "loss=" in last
    assert "<00:00" in last  # tqdm's elapsed<remaining: the ETA
    monkeypatch.setenv(progress.SWITCH, "0")
    finetune_task("yesno", ckpt, ckpt, Hparams(batch_size=16, epochs=1, max_length=16), seed=1,
                  custom_tasks=[task], precision="fp32")
    assert "finetune yesno" not in capsys.readouterr().err


def test_tokenizer_reading_bar_only_where_the_trainer_draws_none(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(progress.SWITCH, raising=False)
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": [f"document {i}" for i in range(50)]}), path)
    for _ in CorpusStream([path], batch_size=10, heldout=0):
        pass
    assert "50/50" in draws(capsys.readouterr().err)[-1]
    monkeypatch.setenv(progress.SWITCH, "0")
    for _ in CorpusStream([path], batch_size=10, heldout=0):
        pass
    assert capsys.readouterr().err == ""
    # On a terminal the tokenizers trainer draws its own bars, reading included: a second one would fight it.
    monkeypatch.delenv(progress.SWITCH)
    screen = Terminal()
    monkeypatch.setattr(progress.sys, "stderr", screen)
    for _ in CorpusStream([path], batch_size=10, heldout=0):
        pass
    assert screen.getvalue() == ""


SHARD_SCHEMA = pa.schema([("doc_id", pa.string()), ("text", pa.string()), ("sentences", pa.list_(pa.string())),
                          ("source", pa.string()), ("metadata", pa.string())])


def test_data_stage_counts_shards_and_documents(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(progress.SWITCH, raising=False)
    sentences = [[f"Document {d} says thing {s} about topic {d % 5}." for s in range(4)] for d in range(30)]
    (tmp_path / "corpus" / "shards").mkdir(parents=True)
    for k, part in enumerate((sentences[:18], sentences[18:])):
        rows = [{"doc_id": f"d{k}-{i}", "text": " ".join(s), "sentences": s, "source": "t", "metadata": "{}"}
                for i, s in enumerate(part)]
        pq.write_table(pa.Table.from_pylist(rows, schema=SHARD_SCHEMA),
                       tmp_path / "corpus" / "shards" / f"part-{k:05d}.parquet")
    tok = save_tokenizer(train_wordpiece(TokenizerConfig(vocab_size=120, min_frequency=1),
                                         iter([[" ".join(s) for s in sentences]])), tmp_path / "tok").output_dir
    cfg = PipelineConfig.model_validate({"workdir": str(tmp_path / "work"),
                                         "data": {"num_proc": 1, "seq_lengths": [32], "heldout_fraction": 0.1}})
    build_pretraining_data(cfg, corpus=tmp_path / "corpus", tokenizer=tok)
    last = draws(capsys.readouterr().err)[-1]
    assert last.startswith("data: shards: 100%") and "2/2" in last and "documents=30" in last


def _write_text_inputs(root: Path) -> Path:
    root.mkdir(parents=True)
    for i in range(5):
        text = " ".join(f"Article {i} talks about topic {i * 7 % 13} and item {j}." for j in range(30))
        (root / f"b{i}.txt").write_text(text)
    (root / "copy.txt").write_text((root / "b2.txt").read_text())
    return root


def test_corpus_stage_counts_units_documents_and_shards(tmp_path, capsys, caplog, monkeypatch):
    monkeypatch.delenv(progress.SWITCH, raising=False)
    inputs = _write_text_inputs(tmp_path / "in")
    cfg = load_config(None, [f"workdir={tmp_path / 'work'}", f"corpus.inputs=[{inputs}]",
                             "corpus.target_shard_bytes=4096"])
    with caplog.at_level(logging.INFO, logger="bertscale.corpus.pipeline"):
        result = run_plain(cfg)
    c = result.counts
    last = draws(capsys.readouterr().err)[-1]
    assert last.startswith("corpus: units: 100%") and f"{c['units']}/{c['units']}" in last
    assert f"passed={c['kept'] + c['duplicates']}" in last and f"shards={c['shards']}" in last
    assert any(r.getMessage().startswith(f"corpus: all {c['units']} units processed") for r in caplog.records)


def _spill(path: Path, rows: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"doc_id": [str(i) for i in range(rows)]}), path)


def test_corpus_progress_counts_finished_units_only(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(progress.SWITCH, raising=False)
    units = tmp_path / "work" / "units"
    plan = StagePlan(units=[object()] * 3, files=[], work_dir=str(tmp_path / "work"), out_dir=str(tmp_path / "out"),
                     buckets=32)
    watcher = UnitProgress(plan, poll_s=3600)
    _spill(units / "unit-000000.parquet", 4)
    (units / "unit-000000.exact").write_bytes(b"")
    _spill(units / "unit-000001.parquet", 7)  # still being processed: no key file yet
    (units / "unit-000002.parquet").write_bytes(b"PAR1 half-written")  # a retried bundle rewriting it
    (units / "unit-000002.exact").write_bytes(b"")
    watcher.poll()
    assert watcher.done == {0} and watcher.documents == 4
    (units / "unit-000001.exact").write_bytes(b"")
    _spill(units / "unit-000002.parquet", 2)
    (tmp_path / "out" / "shards").mkdir(parents=True)
    (tmp_path / "out" / "shards" / "part-00000.parquet").write_bytes(b"")
    watcher.poll()
    assert watcher.done == {0, 1, 2} and watcher.documents == 13 and watcher.shards == 1
    watcher.bar.close()
    last = draws(capsys.readouterr().err)[-1]
    assert "3/3" in last and "passed=13" in last and "shards=1" in last


def test_corpus_progress_does_not_poll_when_switched_off(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(progress.SWITCH, "off")
    plan = StagePlan(units=[object()], files=[], work_dir=str(tmp_path), out_dir=str(tmp_path), buckets=32)
    with UnitProgress(plan, poll_s=0.01) as watcher:
        assert watcher._thread is None
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("switch", ["0", "false", "OFF", "no"])
def test_switch_values(monkeypatch, switch):
    monkeypatch.setenv(progress.SWITCH, switch)
    assert not progress_enabled(is_main=True)
