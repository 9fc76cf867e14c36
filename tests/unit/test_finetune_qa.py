"""Question answering as a fine-tuning kind, on the SQuAD v2.0 sample in tests/data: windows and batches, logits
back per window, the null threshold tuned on dev with the official scoring, prediction files, and the custom task
definition."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bertscale.config import CustomTaskConfig, TokenizerConfig
from bertscale.errors import InputError
from bertscale.finetune import qa
from bertscale.finetune.squad import squad_evaluate
from bertscale.finetune.tasks import QaOptions, get_task, load_eval, load_train
from bertscale.model import BertConfig, BertForQuestionAnswering
from bertscale.tokenizer import train_wordpiece

DATA = Path(__file__).resolve().parents[1] / "data" / "squad"


def _task(**fields) -> CustomTaskConfig:
    defaults = {"train": str(DATA / "train-v2.0.json"), "dev": str(DATA / "dev-v2.0.json"), "max_query_length": 12}
    return CustomTaskConfig(name="qa", kind="question_answering", **{**defaults, **fields})


@pytest.fixture(scope="module")
def tokenizer():
    data = json.loads((DATA / "train-v2.0.json").read_text())["data"]
    texts = [t for a in data for p in a["paragraphs"] for t in [p["context"], *(q["question"] for q in p["qas"])]]
    return train_wordpiece(TokenizerConfig(vocab_size=300, min_frequency=1), iter([texts]))


@pytest.fixture(scope="module")
def model() -> BertForQuestionAnswering:
    torch.manual_seed(0)
    return BertForQuestionAnswering(BertConfig(vocab_size=300, hidden_size=32, num_hidden_layers=1,
                                               num_attention_heads=2, intermediate_size=64,
                                               max_position_embeddings=64)).eval()


def test_custom_task_definition():
    task = get_task("qa", [_task(doc_stride=10, squad_version="2.0")])
    assert task.kind == "question_answering" and task.fmt == "squad" and task.num_labels == 2
    assert task.qa == QaOptions("2.0", 10, 12, 30, 20)
    assert len(load_train(task, None).dataset) == 26 and load_eval(task, None)[0].dataset.version == "2.0"
    # 128 tokens of overlap unless a window is too short for it: then half of its context room.
    assert qa.doc_stride(QaOptions(), 384) == 128 and qa.doc_stride(QaOptions(max_query_length=12), 48) == 16
    assert qa.doc_stride(QaOptions(doc_stride=0), 48) == 0


def test_empty_squad_file_is_an_error(tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"version": "v2.0", "data": []}))
    with pytest.raises(InputError, match=r"empty.json (holds|has) no questions"):
        load_eval(get_task("qa", [_task(dev=str(empty))]), None)


def test_windows_batches_and_training_targets(tokenizer):
    task = get_task("qa", [_task()])
    split = load_train(task, None)
    data = qa.encode(task, split, tokenizer, max_length=48, train=True)
    assert len(data) > len(data.examples) == 26  # long paragraphs give several windows
    batch = qa.collate(data, [0, 1, 2], pad_id=0)
    width = max(data.lengths[:3])
    assert batch["input_ids"].shape == (3, width) and batch["attention_mask"].sum() == sum(data.lengths[:3])
    assert (batch["start_positions"] <= batch["end_positions"]).all() and (batch["end_positions"] < width).all()
    # Windows that hold an answer whole point at its characters; the others (and unanswerable questions) at [CLS].
    f = data.features
    found = set()
    for w in np.flatnonzero(f.start_positions > 0):
        example = data.examples[f.example_index[w]]
        span = example.context[f.offsets[w, f.start_positions[w], 0]:f.offsets[w, f.end_positions[w], 1]]
        assert span.lower() == example.answers[0][0].lower() and not example.is_impossible
        found.add(example.id)
    assert len(found) >= 15  # of 20 answerable questions: an answer longer than a window's overlap may be cut
    # A fixed random subset of questions; the version the task asks for wins over the file's.
    few = qa.encode(get_task("qa", [_task(squad_version="1.1")]), split, tokenizer, 48, limit=5)
    assert len(few.examples) == 5 and few.version == "1.1"
    assert [e.id for e in few.examples] == [e.id for e in qa.encode(task, split, tokenizer, 48, limit=5).examples]


def test_span_logits_per_window_with_padding_masked(tokenizer, model):
    task = get_task("qa", [_task()])
    data = qa.encode(task, load_eval(task, None)[0], tokenizer, max_length=48)
    starts, ends = qa.span_logits(model, data, pad_id=0, precision="fp32", batch_size=4)
    assert starts.shape == ends.shape == data.features.input_ids.shape
    w = int(np.argmin(data.lengths))
    n = data.lengths[w]
    assert (starts[w, n:] == qa.PAD_LOGIT).all()
    with torch.no_grad():
        f = data.features
        _, s, e = model(torch.from_numpy(f.input_ids[w:w + 1, :n]), torch.from_numpy(f.token_type_ids[w:w + 1, :n]),
                        torch.from_numpy(f.attention_mask[w:w + 1, :n]))
    np.testing.assert_allclose(starts[w, :n], s[0].numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ends[w, :n], e[0].numpy(), rtol=1e-5, atol=1e-5)


def test_v2_threshold_is_tuned_on_dev_with_the_official_scoring(tokenizer, model, tmp_path):
    task = get_task("qa", [_task()])
    data = qa.encode(task, load_eval(task, None)[0], tokenizer, max_length=48)
    metrics, details, found = qa.evaluate(model, task, data, pad_id=0, precision="fp32")
    starts, ends = qa.span_logits(model, data, 0, "fp32")
    best, null_odds = qa.answers(task, data, starts, ends, threshold=None)
    threshold = squad_evaluate(data.examples, best, null_odds)["best_f1_thresh"]
    assert details["null_threshold"] == threshold and found["null_odds"] == null_odds
    assert found["predictions"] == {q: "" if null_odds[q] > threshold else t for q, t in best.items()}
    assert details["official"] == squad_evaluate(data.examples, found["predictions"], null_odds)
    assert metrics["f1"] == details["official"]["f1"] / 100 == metrics["score"]
    assert metrics["NoAns_exact"] == details["official"]["NoAns_exact"] / 100
    assert "HasAns_total" not in metrics  # counts stay in the official output, not among the fractions
    files = qa.write_files(tmp_path, "dev", found["predictions"], found["null_odds"])
    assert sorted(files) == ["dev", "dev-null_odds"]
    assert json.loads(Path(files["dev"]).read_text()) == found["predictions"]
    assert Path(files["dev"]).name == "predictions.json" and Path(files["dev-null_odds"]).name == "null_odds.json"
    assert qa.dev_threshold([details, {"null_threshold": threshold + 2}]) == pytest.approx(threshold + 1)
    assert qa.dev_threshold([{}]) == 0.0


def test_v1_has_no_null_answers(tokenizer, model):
    task = get_task("qa", [_task(squad_version="1.1")])
    split = load_eval(task, None)[0]
    split.dataset.examples = [e for e in split.dataset.examples if e.answers]
    data = qa.encode(task, split, tokenizer, max_length=48)
    metrics, details, found = qa.evaluate(model, task, data, pad_id=0, precision="fp32")
    assert set(metrics) == {"exact", "f1", "score"} and found["null_odds"] is None
    assert "null_threshold" not in details and details["official"]["total"] == 10
    assert all(text != "" for text in found["predictions"].values())
