"""NER and QA on the real files `scripts/fetch_task_data.sh` takes out of PyPI packages (found through
BERTSCALE_TASK_DATA, else .task-data in the repository; skipped where absent): entity scores equal seqeval's on the
CoNLL-2000 gold/predicted file seqeval checks against conlleval; the WNUT 2016, CoNLL-2003 and CoNLL-2000 layouts
load; a suite fine-tunes NER on WNUT 2016 and QA on the SQuAD v1.1 and Quoref samples, and the prediction files it
writes score the same under the official SQuAD evaluation scripts as in results.json (v2.0 too, on the
tests/data sample)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from bertscale.config import CustomTaskConfig, PipelineConfig
from bertscale.finetune import run_finetune
from bertscale.finetune.conll import read_conll
from bertscale.finetune.tagging import ner_metrics
from bertscale.finetune.tasks import get_task, load_train

from test_finetune_ner_qa import SQUAD_DEV, SQUAD_TRAIN, _squad_texts, tiny_checkpoint

REPO = Path(__file__).resolve().parents[2]
TASK_DATA = Path(os.environ.get("BERTSCALE_TASK_DATA", REPO / ".task-data"))


@pytest.fixture(scope="module")
def data() -> Path:
    if not (TASK_DATA / "ner").is_dir():
        pytest.skip(f"no task data at {TASK_DATA}; run scripts/fetch_task_data.sh or set BERTSCALE_TASK_DATA")
    return TASK_DATA


def test_entity_scores_equal_seqeval_on_the_conlleval_check_file(data):
    path = data / "ner" / "conll2000-chunking-gold-pred.txt"
    gold = [s.tags for s in read_conll(path, tag_column=-2)]
    predicted = [s.tags for s in read_conll(path, tag_column=-1)]
    assert sum(map(len, gold)) > 900
    metrics, support = ner_metrics(gold, predicted)
    seqeval = pytest.importorskip("seqeval.metrics", reason="seqeval (dev extra) is not installed")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = seqeval.classification_report(gold, predicted, output_dict=True, digits=6)
        assert metrics["f1"] == seqeval.f1_score(gold, predicted)
        assert metrics["precision"] == seqeval.precision_score(gold, predicted)
        assert metrics["recall"] == seqeval.recall_score(gold, predicted)
        assert metrics["accuracy"] == seqeval.accuracy_score(gold, predicted)
    for kind, row in report.items():
        if not kind.endswith(" avg"):
            assert metrics[f"{kind}.f1"] == pytest.approx(row["f1-score"], abs=1e-12) and support[kind] == row["support"]


def test_real_layouts_load(data):
    wnut = get_task("wnut", [CustomTaskConfig(name="wnut", kind="token_classification",
                                              train=str(data / "ner" / "wnut16-train.txt"))])
    sentences = load_train(wnut, None).dataset
    assert len(sentences) == 2394 and sum(map(len, sentences["tokens"])) == 46469
    assert {"B-person", "I-geo-loc", "B-musicartist"} <= set(wnut.labels) and wnut.labels[0] == "O"
    conll = get_task("c", [CustomTaskConfig(name="c", kind="token_classification", tag_scheme="iob1",
                                            train=str(data / "ner" / "conll2003-sample.txt"))])
    first = load_train(conll, None).dataset[0]
    assert first["tokens"][:3] == ["U.N.", "official", "Ekeus"] and first["tags"][:3] == ["I-ORG", "O", "I-PER"]
    # IOB1's I- tags are not IOB2 tags at a sentence start, but seqeval's reading accepts both: only the prefixes
    # a scheme has are checked.
    assert get_task("c2", [CustomTaskConfig(name="c2", kind="token_classification",
                                            train=str(data / "ner" / "conll2003-sample.txt"))]).labels
    chunks = get_task("k", [CustomTaskConfig(name="k", kind="token_classification", tag_column=-2,
                                             train=str(data / "ner" / "conll2000-chunking-gold-pred.txt"))])
    assert {"B-NP", "I-NP", "B-VP"} <= set(chunks.labels)


def _official(script: Path, *args: str) -> dict:
    done = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_suite_on_real_files_and_the_official_squad_scripts(data, tmp_path):
    wnut = data / "ner" / "wnut16-train.txt"
    squad, quoref = data / "qa" / "squad-v1.1-sample.json", data / "qa" / "quoref-sample.json"
    texts = [" ".join(s.tokens) for s in read_conll(wnut)] + _squad_texts(squad) + _squad_texts(quoref) \
        + _squad_texts(SQUAD_TRAIN)
    ckpt = tiny_checkpoint(tmp_path / "ckpt", texts, vocab_size=1000)
    tasks = [{"name": "wnut", "kind": "token_classification", "train": str(wnut), "dev": str(wnut)},
             {"name": "squad", "kind": "question_answering", "train": str(quoref), "dev": str(squad),
              "max_query_length": 16},
             {"name": "squad2", "kind": "question_answering", "train": str(SQUAD_TRAIN), "dev": str(SQUAD_DEV),
              "max_query_length": 16}]
    cfg = PipelineConfig.model_validate({
        "workdir": str(tmp_path / "work"), "tracking": {"enabled": False},
        "finetune": {"tasks": ["wnut", "squad", "squad2"], "custom_tasks": tasks, "seeds": [0], "epochs": 1,
                     "batch_size": 16, "max_length": 48, "lr": 3e-3, "precision": "fp32",
                     "max_train_examples": 400, "max_eval_examples": 200}})
    result = run_finetune(cfg, checkpoint=str(ckpt))
    results = json.loads((Path(result.output_dir) / "results.json").read_text())
    assert results["failures"] == [] and set(results["tasks"]) == {"wnut", "squad", "squad2"}
    assert results["tasks"]["wnut"]["details"]["wnut"]["sentences"] == 200

    v1 = result.tasks["squad"].best
    versioned = tmp_path / "squad-v1.1.json"  # the official script insists on a version field the sample lacks
    versioned.write_text(json.dumps({**json.loads(squad.read_text()), "version": "1.1"}))
    official = _official(data / "reference" / "evaluate-v1.1.py", str(versioned), v1.dev_predictions["squad"])
    assert official["exact_match"] == pytest.approx(v1.details["squad"]["official"]["exact"], abs=1e-9)
    assert official["f1"] == pytest.approx(v1.details["squad"]["official"]["f1"], abs=1e-9)

    v2 = result.tasks["squad2"].best
    out = tmp_path / "eval-v2.json"
    subprocess.run([sys.executable, str(data / "reference" / "evaluate-v2.0.py"), str(SQUAD_DEV),
                    v2.dev_predictions["squad2"], "--na-prob-file", v2.dev_predictions["squad2-null_odds"],
                    "--na-prob-thresh", "1e30", "--out-file", str(out)], check=True, timeout=120)
    official = json.loads(out.read_text())
    ours = v2.details["squad2"]["official"]
    assert set(official) == set(ours)
    for key, value in official.items():
        assert ours[key] == pytest.approx(value, abs=1e-9), key
