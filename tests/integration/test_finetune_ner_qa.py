"""Token classification (NER) and question answering through the same suite as GLUE, on real-format files
(tests/data: CoNLL and SQuAD v2.0 samples of public-domain text): seeds with median and spread, results.md and
results.json with the official metrics (equal to seqeval and to the SQuAD scoring of the written prediction
files), per-epoch curves in nested MLflow runs, registered models behind the champion gate that MLflow's pyfunc
loads and that predict what fine-tuning predicted; the command line with custom tasks in YAML (JSONL tags and
SQuAD v1.1); and both kinds learning a task a tiny model can learn."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import warnings
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
import yaml

from bertscale import tracking
from bertscale.config import CustomTaskConfig, PipelineConfig, TokenizerConfig
from bertscale.finetune import finetune_task, run_finetune
from bertscale.finetune.conll import read_conll
from bertscale.finetune.squad import load_squad, squad_evaluate
from bertscale.finetune.tagging import ner_metrics
from bertscale.model import BertConfig, BertForPreTraining
from bertscale.model.hf import export_hf
from bertscale.tokenizer import save_tokenizer, train_wordpiece

DATA = Path(__file__).resolve().parents[1] / "data"
NER_TRAIN, NER_DEV = DATA / "ner" / "train.conll", DATA / "ner" / "dev.conll"
SQUAD_TRAIN, SQUAD_DEV = DATA / "squad" / "train-v2.0.json", DATA / "squad" / "dev-v2.0.json"


def _squad_texts(path: Path) -> list[str]:
    data = json.loads(path.read_text())["data"]
    return [t for a in data for p in a["paragraphs"] for t in [p["context"], *(q["question"] for q in p["qas"])]]


def tiny_checkpoint(path: Path, texts: list[str], vocab_size: int = 400) -> Path:
    """A random-init BERT small enough for CPU tests, with a WordPiece tokenizer trained on `texts`."""
    torch.set_num_threads(1)
    vocab = save_tokenizer(train_wordpiece(TokenizerConfig(vocab_size=vocab_size, min_frequency=1), iter([texts])),
                           path).vocab_size
    torch.manual_seed(0)
    export_hf(BertForPreTraining(BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=1,
                                            num_attention_heads=2, intermediate_size=64,
                                            max_position_embeddings=64)), path)
    return path


def v1_copy(src: Path, dst: Path) -> Path:
    """A SQuAD v1.1 file from a v2.0 one: the answerable questions only."""
    data = json.loads(src.read_text())
    for article in data["data"]:
        for p in article["paragraphs"]:
            p["qas"] = [{k: q[k] for k in ("id", "question", "answers")} for q in p["qas"] if not q["is_impossible"]]
    dst.write_text(json.dumps({"version": "1.1", "data": data["data"]}))
    return dst


@pytest.fixture(scope="module")
def suite(tmp_path_factory) -> dict:
    """One suite over NER (CoNLL) and QA (SQuAD v2.0), two seeds, tracked and registered."""
    tmp = tmp_path_factory.mktemp("ner-qa")
    texts = [" ".join(s.tokens) for s in read_conll(NER_TRAIN)] + _squad_texts(SQUAD_TRAIN)
    ckpt = tiny_checkpoint(tmp / "ckpt", texts)
    ner = CustomTaskConfig(name="ner", kind="token_classification", train=str(NER_TRAIN), dev=str(NER_DEV),
                           test=str(NER_DEV))
    qa = CustomTaskConfig(name="qa", kind="question_answering", train=str(SQUAD_TRAIN), dev=str(SQUAD_DEV),
                          test=str(SQUAD_DEV), max_query_length=16)
    cfg = PipelineConfig.model_validate({
        "name": "nq", "workdir": str(tmp / "work"),
        "finetune": {"tasks": ["ner", "qa"], "custom_tasks": [ner.model_dump(), qa.model_dump()], "seeds": [0, 1],
                     "epochs": 2, "batch_size": 8, "max_length": 48, "lr": 3e-3, "precision": "fp32"},
    })
    result = run_finetune(cfg, checkpoint=str(ckpt))
    return {"cfg": cfg, "result": result, "out": Path(result.output_dir), "ckpt": ckpt,
            "tasks": {"ner": ner, "qa": qa}}


def test_results_carry_the_official_metrics(suite):
    out = suite["out"]
    results = json.loads((out / "results.json").read_text())
    assert results["failures"] == [] and set(results["scores"]) == {"ner", "qa"}
    ner, qa = results["tasks"]["ner"], results["tasks"]["qa"]
    assert ner["seeds"] == [0, 1] and qa["seeds"] == [0, 1]
    assert {"precision", "recall", "f1", "accuracy", "score", "LOC.f1", "ORG.f1"} <= set(ner["metrics"]["ner"])
    assert set(qa["metrics"]["qa"]) == {"exact", "f1", "HasAns_exact", "HasAns_f1", "NoAns_exact", "NoAns_f1",
                                        "best_exact", "best_f1", "score"}
    official = qa["details"]["qa"]["official"]
    assert official["total"] == 13 and official["HasAns_total"] == 10 and official["NoAns_total"] == 3
    assert {"best_f1", "best_f1_thresh", "best_exact_thresh"} <= set(official)
    assert isinstance(qa["details"]["qa"]["null_threshold"], float)
    assert ner["details"]["ner"]["support"] == {"LOC": 10, "MISC": 5, "ORG": 12}
    table = (out / "results.md").read_text()
    assert "| ner | precision" in table and "| qa | exact" in table and "LOC.f1" not in table
    for stats in (ner["metrics"]["ner"], qa["metrics"]["qa"]):
        assert all(0.0 <= v["median"] <= 1.0 and v["spread"] >= 0.0 for v in stats.values())
    # The best run's test predictions, in the input formats, form the submission folder.
    assert sorted(results["submission_files"]) == ["ner.conll", "qa-null_odds.json", "qa.json"]


def test_ner_scores_are_seqevals_on_the_written_predictions(suite):
    best = suite["result"].tasks["ner"].best
    written = Path(best.dev_predictions["ner"])
    gold = [s.tags for s in read_conll(written, tag_column=-2)]
    predicted = [s.tags for s in read_conll(written, tag_column=-1)]
    assert gold == [s.tags for s in read_conll(NER_DEV)]  # every dev sentence, gold column kept
    metrics = best.metrics["ner"]
    assert ner_metrics(gold, predicted)[0] == metrics
    seqeval = pytest.importorskip("seqeval.metrics", reason="seqeval (dev extra) is not installed")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert metrics["f1"] == seqeval.f1_score(gold, predicted)
        assert metrics["precision"] == seqeval.precision_score(gold, predicted)
        assert metrics["recall"] == seqeval.recall_score(gold, predicted)
        assert metrics["accuracy"] == seqeval.accuracy_score(gold, predicted)


def test_qa_scores_are_the_official_scoring_of_the_written_files(suite):
    best = suite["result"].tasks["qa"].best
    predictions = json.loads(Path(best.dev_predictions["qa"]).read_text())
    null_odds = json.loads(Path(best.dev_predictions["qa-null_odds"]).read_text())
    official = squad_evaluate(load_squad(SQUAD_DEV), predictions, null_odds)
    assert official == best.details["qa"]["official"]
    assert best.metrics["qa"]["f1"] == pytest.approx(official["f1"] / 100)
    # Unanswered where the null odds pass the threshold tuned on dev, answered elsewhere.
    threshold = best.details["qa"]["null_threshold"]
    assert all((text == "") == (null_odds[q] > threshold) for q, text in predictions.items())
    test_predictions = json.loads(Path(best.predictions["qa"]).read_text())
    assert test_predictions == predictions  # the test file is the dev file here: same threshold, same answers


def test_mlflow_runs_curves_and_registered_models(suite):
    cfg = suite["cfg"]
    tracking.configure(cfg)
    client = mlflow.MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])
    nested = [r for r in runs if r.data.tags.get("bertscale.task") in ("ner", "qa")
              and r.data.tags.get("mlflow.parentRunId")]
    assert sorted((r.data.tags["bertscale.task"], r.data.tags["bertscale.seed"]) for r in nested) == [
        ("ner", "0"), ("ner", "1"), ("qa", "0"), ("qa", "1")]
    ner_run = next(r for r in nested if r.data.tags["bertscale.task"] == "ner")
    assert [m.step for m in client.get_metric_history(ner_run.info.run_id, "ner.f1")] == [1, 2]
    assert len(client.get_metric_history(ner_run.info.run_id, "ner.LOC.f1")) == 2
    assert suite["result"].registered == {"nq-ner": "1", "nq-qa": "1"}
    assert all(p.startswith("champion") for p in suite["result"].promotions.values())
    kinds = {name: client.get_model_version_by_alias(name, "champion").tags["bertscale.kind"]
             for name in ("nq-ner", "nq-qa")}
    assert kinds == {"nq-ner": "tagger", "nq-qa": "question-answering"}


def test_pyfunc_predicts_what_fine_tuning_predicted(suite):
    tracking.configure(suite["cfg"])
    tagger = mlflow.pyfunc.load_model("models:/nq-ner@champion")
    assert tagger.metadata.signature.inputs.input_names() == ["text"]
    assert tagger.metadata.signature.outputs.input_names() == ["entities", "tags"]
    written = Path(suite["result"].tasks["ner"].best.dev_predictions["ner"])
    sentences = read_conll(written, tag_column=-1)
    out = tagger.predict(pd.DataFrame({"text": [" ".join(s.tokens) for s in sentences]}))
    assert out["tags"].tolist() == [s.tags for s in sentences]
    for row, s in zip(out.itertuples(), sentences):
        for e in row.entities:
            assert e["text"] == " ".join(s.tokens[e["start_word"] : e["end_word"] + 1])
            assert s.tags[e["start_word"]] in (f"B-{e['entity']}", f"I-{e['entity']}")

    reader = mlflow.pyfunc.load_model("models:/nq-qa@champion")
    assert reader.metadata.signature.inputs.input_names() == ["question", "context"]
    squad = load_squad(SQUAD_DEV)
    out = reader.predict(pd.DataFrame({"question": [e.question for e in squad],
                                       "context": [e.context for e in squad]}))
    predictions = json.loads(Path(suite["result"].tasks["qa"].best.dev_predictions["qa"]).read_text())
    null_odds = json.loads(Path(suite["result"].tasks["qa"].best.dev_predictions["qa-null_odds"]).read_text())
    assert out["answer"].tolist() == [predictions[e.id] for e in squad]
    assert out["score"].tolist() == pytest.approx([-null_odds[e.id] for e in squad], abs=1e-4)
    with pytest.raises(mlflow.exceptions.MlflowException, match=r"missing inputs \['context'\]"):
        reader.predict(pd.DataFrame({"question": ["Who?"]}))
    with pytest.raises(mlflow.exceptions.MlflowException, match=r"rows \[1\] have an empty question or context"):
        reader.predict(pd.DataFrame({"question": ["Who?", " "], "context": ["Lincoln spoke.", "Lincoln spoke."]}))


def test_cli_finetunes_custom_tasks_from_yaml(tmp_path):
    """JSONL tags (a tokens/tags record per line) and SQuAD v1.1, defined in YAML, through `bertscale finetune`."""
    jsonl = tmp_path / "ner.jsonl"
    sentences = read_conll(NER_TRAIN)
    jsonl.write_text("".join(json.dumps({"id": f"s{i}", "words": s.tokens, "labels": s.tags}) + "\n"
                             for i, s in enumerate(sentences)))
    squad = v1_copy(SQUAD_TRAIN, tmp_path / "train-v1.1.json")
    ckpt = tiny_checkpoint(tmp_path / "ckpt", [" ".join(s.tokens) for s in sentences] + _squad_texts(squad))
    config = {"finetune": {
        "custom_tasks": [
            {"name": "tags", "kind": "token_classification", "train": str(jsonl), "dev": str(jsonl),
             "tokens": "words", "tags": "labels", "index": "id", "doc_stride": 4},
            {"name": "answers", "kind": "question_answering", "train": str(squad), "dev": str(squad),
             "max_query_length": 12, "doc_stride": 8}],
        "epochs": 1, "batch_size": 16, "max_length": 32, "precision": "fp32"}}
    (tmp_path / "tasks.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "bertscale", "finetune", "--config", str(tmp_path / "tasks.yaml"),
                           "--checkpoint", str(ckpt), "--tasks", "tags", "answers", "--seeds", "3",
                           "--workdir", str(tmp_path / "work"), "--no-tracking"],
                          capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| tags | precision" in done.stdout and "| answers | exact" in done.stdout
    results = json.loads((tmp_path / "work" / "finetune" / "results.json").read_text())
    assert set(results["tasks"]["answers"]["metrics"]["answers"]) == {"exact", "f1", "score"}
    assert results["tasks"]["answers"]["details"]["answers"]["official"]["total"] == 20
    written = Path(results["tasks"]["tags"]["dev_predictions"]["tags"])
    records = [json.loads(line) for line in written.read_text().splitlines()]
    assert [r["id"] for r in records] == [f"s{i}" for i in range(len(sentences))]
    assert all(len(r["predicted_tags"]) == len(r["words"]) for r in records)

    # A bad record is one line naming the file and the record, no traceback.
    jsonl.write_text(json.dumps({"id": "x", "words": ["a", "b"], "labels": ["O"]}) + "\n")
    done = subprocess.run([sys.executable, "-m", "bertscale", "finetune", "--config", str(tmp_path / "tasks.yaml"),
                           "--checkpoint", str(ckpt), "--tasks", "tags", "--workdir", str(tmp_path / "bad"),
                           "--no-tracking"], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"{jsonl}:1: 1 tags for 2 tokens" in done.stderr


def test_both_kinds_learn_a_learnable_task(tmp_path):
    """Entities marked by their words, answers marked by the words before them: a tiny model learns both,
    through windows (sentences and contexts longer than max_length)."""
    rng = random.Random(0)
    people, places, filler = ["alice", "bob", "carol"], ["paris", "rome", "oslo"], "the a went to saw and in".split()
    rows = []
    for _ in range(160):
        words, tags = [], []
        for _ in range(rng.randint(6, 14)):
            r = rng.random()
            word, tag = ((rng.choice(people), "B-PER") if r < 0.2 else (rng.choice(places), "B-LOC") if r < 0.35
                         else (rng.choice(filler), "O"))
            words.append(word)
            tags.append(tag)
        rows.append(" ".join(f"{w} {t}\n" for w, t in zip(words, tags)))
    conll = tmp_path / "people.conll"
    conll.write_text("\n".join(r.replace("\n ", "\n") for r in rows))
    data, contexts = [], []
    for i in range(120):
        words = [rng.choice(filler) for _ in range(rng.randint(4, 16))]
        at, answer = rng.randint(0, len(words)), rng.choice(places)
        context = " ".join(words[:at] + ["capital", "is", answer] + words[at:])
        contexts.append(context)
        start = context.index("capital is ") + len("capital is ")
        data.append({"title": "t", "paragraphs": [{"context": context, "qas": [
            {"id": f"q{i}", "question": "what is the capital ?", "answers": [{"text": answer, "answer_start": start}]}]}]})
    squad = tmp_path / "capitals.json"
    squad.write_text(json.dumps({"version": "1.1", "data": data}))
    ckpt = tiny_checkpoint(tmp_path / "ckpt", [r.replace("\n", " ") for r in rows] + contexts, vocab_size=80)
    tasks = [CustomTaskConfig(name="people", kind="token_classification", train=str(conll), dev=str(conll)),
             CustomTaskConfig(name="capitals", kind="question_answering", train=str(squad), dev=str(squad),
                              max_query_length=6)]
    hp = {"lr": 3e-3, "batch_size": 16, "epochs": 4, "max_length": 12}
    people = finetune_task("people", ckpt, ckpt, hp, custom_tasks=tasks, precision="fp32")
    assert people.metrics["people"]["f1"] >= 0.95
    capitals = finetune_task("capitals", ckpt, ckpt, {**hp, "max_length": 16}, custom_tasks=tasks,
                             precision="fp32")
    assert capitals.metrics["capitals"]["exact"] >= 0.9
    assert capitals.history[-1].train_loss < capitals.history[0].train_loss / 2


def test_prefect_flow_fine_tunes_ner_and_qa(tmp_path, prefect_harness):
    """The fine-tuning flow runs one Prefect task per task, NER and QA alike, each with its own results."""
    from pipelines.finetune import finetune_flow

    texts = [" ".join(s.tokens) for s in read_conll(NER_TRAIN)] + _squad_texts(SQUAD_TRAIN)
    ckpt = tiny_checkpoint(tmp_path / "ckpt", texts)
    config = {"workdir": str(tmp_path / "work"), "tracking": {"enabled": False}, "finetune": {
        "tasks": ["ner", "qa"], "epochs": 1, "batch_size": 16, "max_length": 48, "precision": "fp32",
        "custom_tasks": [
            {"name": "ner", "kind": "token_classification", "train": str(NER_TRAIN), "dev": str(NER_DEV)},
            {"name": "qa", "kind": "question_answering", "train": str(SQUAD_TRAIN), "dev": str(SQUAD_DEV),
             "max_query_length": 16}]}}
    (tmp_path / "flow.yaml").write_text(yaml.safe_dump(config))
    out = finetune_flow(config=str(tmp_path / "flow.yaml"), checkpoint=str(ckpt))
    assert set(out) == {"ner", "qa"}
    assert set(out["ner"]["tasks"]["ner"]["metrics"]["ner"]) >= {"precision", "recall", "f1", "accuracy"}
    assert out["qa"]["tasks"]["qa"]["details"]["qa"]["official"]["NoAns_total"] == 3
    assert (tmp_path / "work" / "finetune" / "qa" / "results.json").is_file()
