"""The fine-tuning loop on a tiny random-init BERT: batching, padding, learning a keyword task, saved models
predicting the same, submission files, and tokenizers that do or do not fit the checkpoint."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from bertscale.config import CustomTaskConfig, TokenizerConfig
from bertscale.errors import ConfigError
from bertscale.finetune.tasks import Hparams, get_task, load_eval
from bertscale.finetune.encoding import (
    Encoded,
    collate,
    encode_split,
    length_grouped_batches,
    load_checked_tokenizer,
    prepare_tokenizer,
)
from bertscale.finetune.evaluation import predict
from bertscale.finetune.trainer import finetune_task
from bertscale.model import BertConfig, BertForPreTraining, BertForSequenceClassification
from bertscale.model.hf import export_hf, load_pretrained
from bertscale.tokenizer import build_wordpiece, load_tokenizer, save_tokenizer, train_wordpiece

WORDS = "the a movie film plot actor scene story music was is very quite really rather".split()


def _sentence(rng: random.Random, label: int) -> str:
    words = rng.choices(WORDS, k=rng.randint(3, 12))
    words.insert(rng.randrange(len(words) + 1), rng.choice(["great", "wonderful"] if label else ["awful", "boring"]))
    return " ".join(words)


@pytest.fixture(scope="module")
def keyword_task(tmp_path_factory: pytest.TempPathFactory) -> tuple[CustomTaskConfig, Path]:
    """A sentiment-by-keyword task (CSV) and a tiny random-init checkpoint with a tokenizer trained on it."""
    torch.set_num_threads(1)  # the test machine's cores are shared; small ops gain nothing from threads
    root = tmp_path_factory.mktemp("keyword")
    rng = random.Random(0)
    for split, n in (("train", 320), ("dev", 80)):
        rows = [(i, _sentence(rng, i % 2), i % 2) for i in range(n)]
        (root / f"{split}.csv").write_text("id,text,label\n" + "".join(f"{i},{t},{y}\n" for i, t, y in rows))
    (root / "test.csv").write_text("id,text\n" + "".join(f"t{i},{_sentence(rng, i % 2)}\n" for i in range(10)))
    texts = (root / "train.csv").read_text().splitlines()[1:]
    tok = train_wordpiece(TokenizerConfig(vocab_size=200, min_frequency=1), iter([texts]))
    ckpt = root / "ckpt"
    vocab = save_tokenizer(tok, ckpt).vocab_size
    config = BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    export_hf(BertForPreTraining(config), ckpt)
    task = CustomTaskConfig(name="keywords", train=str(root / "train.csv"), dev=str(root / "dev.csv"),
                            test=str(root / "test.csv"), text_a="text", index="id")
    return task, ckpt


def test_length_grouped_batches_cover_every_example_once_with_little_padding() -> None:
    rng = random.Random(1)
    lengths = [rng.randint(5, 120) for _ in range(1000)]
    batches = length_grouped_batches(lengths, 16, seed=3, mega=8)
    assert sorted(i for b in batches for i in b) == list(range(1000))
    assert all(len(b) <= 16 for b in batches)
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    random_padded = sum(max(lengths[i] for i in lengths_batch) * len(lengths_batch)
                        for lengths_batch in [list(range(k, min(k + 16, 1000))) for k in range(0, 1000, 16)])
    assert padded < 0.75 * random_padded
    assert batches != length_grouped_batches(lengths, 16, seed=4, mega=8)  # the order changes every epoch


def test_collate_pads_to_the_longest_in_the_batch() -> None:
    data = Encoded("x", ["0", "1"], [[2, 5, 3], [2, 6, 7, 8, 3]], [[0, 0, 0], [0, 0, 1, 1, 1]], np.array([1, 0]))
    batch = collate(data, [0, 1], pad_id=0, regression=False)
    assert batch["input_ids"].tolist() == [[2, 5, 3, 0, 0], [2, 6, 7, 8, 3]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["token_type_ids"][1].tolist() == [0, 0, 1, 1, 1] and batch["labels"].tolist() == [1, 0]


def test_pairs_are_truncated_longest_first(keyword_task: tuple[CustomTaskConfig, Path]) -> None:
    _, ckpt = keyword_task
    tok = prepare_tokenizer(load_tokenizer(ckpt), max_length=12)
    enc = tok.encode("the movie was very very very very very good", "the plot")
    assert len(enc.ids) == 12 and enc.type_ids.count(1) == 3  # B keeps both words + [SEP]; A was cut


def test_finetune_learns_saves_and_predicts(keyword_task: tuple[CustomTaskConfig, Path], tmp_path: Path) -> None:
    task_cfg, ckpt = keyword_task
    hp = Hparams(lr=3e-3, batch_size=16, epochs=4, max_length=32)
    result = finetune_task("keywords", ckpt, ckpt, hp, seed=0, custom_tasks=[task_cfg], output_dir=tmp_path,
                           precision="fp32")
    assert result.metrics["keywords"]["accuracy"] > 0.9
    assert len(result.history) == 4 and result.best_epoch == int(np.argmax([h.selection for h in result.history])) + 1
    assert sum(map(sum, result.confusion["keywords"])) == 80
    lines = Path(result.predictions["keywords"]).read_text().splitlines()
    assert lines[0] == "index\tprediction" and len(lines) == 11
    assert lines[1].split("\t")[0] == "t0" and lines[1].split("\t")[1] in ("0", "1")
    # The saved best model reproduces the reported dev metric.
    model, report = load_pretrained(result.model_dir, BertForSequenceClassification)
    assert report.missing == [] and model.num_labels == 2
    task = get_task("keywords", [task_cfg])
    dev = encode_split(load_eval(task, None)[0], prepare_tokenizer(load_tokenizer(result.model_dir), 32))
    preds = predict(model, dev, pad_id=0, precision="fp32")
    assert float((preds == dev.labels).mean()) == pytest.approx(result.metrics["keywords"]["accuracy"])


def _tiny_checkpoint(path: Path, vocab_size: int) -> Path:
    torch.manual_seed(0)
    return export_hf(BertForPreTraining(BertConfig(vocab_size=vocab_size, hidden_size=16, num_hidden_layers=1,
                                                   num_attention_heads=2, intermediate_size=32,
                                                   max_position_embeddings=16)), path)


def test_tokenizer_larger_than_the_embedding_table_is_rejected(keyword_task: tuple[CustomTaskConfig, Path],
                                                                tmp_path: Path) -> None:
    task_cfg, ckpt = keyword_task
    words = [f"w{i}x{j}" for i in range(40) for j in range(10)]
    other = train_wordpiece(TokenizerConfig(vocab_size=600, min_frequency=1), iter([words]))
    save_tokenizer(other, tmp_path / "tok")
    assert other.get_vocab_size() > load_tokenizer(ckpt).get_vocab_size()
    with pytest.raises(ConfigError, match=rf"tokenizer {tmp_path / 'tok'} has \d+ tokens but checkpoint {ckpt}"):
        finetune_task("keywords", ckpt, tmp_path / "tok", Hparams(epochs=1), custom_tasks=[task_cfg])


def test_tokenizer_smaller_than_a_padded_embedding_table_is_accepted(keyword_task: tuple[CustomTaskConfig, Path],
                                                                     tmp_path: Path) -> None:
    _, ckpt = keyword_task
    tok = load_tokenizer(ckpt)
    n = tok.get_vocab_size(with_added_tokens=True)
    padded = _tiny_checkpoint(tmp_path / "padded", n + 6)  # as 30522 tokens in 30528 rows
    save_tokenizer(tok, padded)
    assert load_checked_tokenizer(padded, padded).get_vocab_size(with_added_tokens=True) == n


def test_special_token_ids_must_match_the_checkpoints_tokenizer(keyword_task: tuple[CustomTaskConfig, Path],
                                                                tmp_path: Path) -> None:
    _, ckpt = keyword_task
    vocab = load_tokenizer(ckpt).get_vocab(with_added_tokens=True)
    # Same tokens, same size, but [PAD] and [MASK] trade ids: embeddings would be looked up in the wrong rows.
    swapped = {**vocab, "[PAD]": vocab["[MASK]"], "[MASK]": vocab["[PAD]"]}
    save_tokenizer(build_wordpiece(swapped), tmp_path / "swapped")
    with pytest.raises(ConfigError, match=r"special tokens different ids \(\[PAD\] 4 vs 0, \[MASK\] 0 vs 4\)"):
        load_checked_tokenizer(tmp_path / "swapped", ckpt)
    # Without a tokenizer recorded in the checkpoint there is nothing to compare with.
    bare = _tiny_checkpoint(tmp_path / "bare", len(vocab))
    assert load_checked_tokenizer(tmp_path / "swapped", bare).token_to_id("[PAD]") == 4


def test_given_tokenizer_overrides_the_checkpoints_own_with_a_warning(keyword_task: tuple[CustomTaskConfig, Path],
                                                                      tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    from bertscale.config import PipelineConfig
    from bertscale.finetune import resolve_tokenizer

    _, ckpt = keyword_task
    save_tokenizer(load_tokenizer(ckpt), tmp_path / "given")
    cfg = PipelineConfig(workdir=str(tmp_path))
    assert resolve_tokenizer(ckpt, None, cfg) == ckpt
    assert not caplog.records
    assert resolve_tokenizer(ckpt, str(tmp_path / "given"), cfg) == tmp_path / "given"
    assert any(r.levelname == "WARNING" and "not the one saved with checkpoint" in r.getMessage()
               for r in caplog.records)


def test_suite_grid_in_process_pool_picks_best_point(keyword_task: tuple[CustomTaskConfig, Path],
                                                     tmp_path: Path) -> None:
    from bertscale.config import PipelineConfig
    from bertscale.finetune import run_finetune

    task_cfg, ckpt = keyword_task
    cfg = PipelineConfig.model_validate({
        "workdir": str(tmp_path), "tracking": {"enabled": False},
        "finetune": {"tasks": ["keywords"], "custom_tasks": [task_cfg.model_dump()], "seeds": [0, 1],
                     "grid_lr": [1e-5, 3e-3], "epochs": 4, "batch_size": 16, "max_length": 32, "precision": "fp32",
                     "num_workers": 2},
    })
    result = run_finetune(cfg, checkpoint=str(ckpt))
    summary = result.tasks["keywords"]
    assert set(summary.grid) == {"lr1e-05_bs16", "lr0.003_bs16"} and summary.hparams["lr"] == 3e-3
    assert len(summary.runs) == 2 and {r.seed for r in summary.runs} == {0, 1}
    assert summary.stats["keywords"]["accuracy"][0] > 0.8
    assert (Path(result.submission_dir) / "keywords.tsv").is_file() and result.registered == {}
    assert "| keywords |" in (tmp_path / "finetune" / "results.md").read_text()


def test_process_pool_collects_a_failed_job_and_keeps_the_others(keyword_task: tuple[CustomTaskConfig, Path],
                                                                  tmp_path: Path) -> None:
    from dataclasses import replace

    from bertscale.config import PipelineConfig
    from bertscale.finetune.suite import build_jobs, run_jobs

    task_cfg, ckpt = keyword_task
    cfg = PipelineConfig.model_validate({
        "workdir": str(tmp_path), "tracking": {"enabled": False},
        "finetune": {"tasks": ["keywords"], "custom_tasks": [task_cfg.model_dump()], "seeds": [0, 1], "epochs": 1,
                     "batch_size": 16, "max_length": 32, "precision": "fp32", "max_train_examples": 32,
                     "max_eval_examples": 16, "predict_test": False},
    })
    good, doomed = build_jobs(cfg, ckpt, ckpt, tmp_path / "out")
    results, failures = run_jobs([good, replace(doomed, tokenizer=str(tmp_path / "no-such-tokenizer"))], 2)
    assert [(r.task, r.seed) for r in results] == [("keywords", 0)]
    assert [(f.task, f.seed) for f in failures] == [("keywords", 1)]
    assert failures[0].error.startswith("InputError: no tokenizer at")
