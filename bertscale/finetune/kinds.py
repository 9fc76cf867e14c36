"""What fine-tuning needs to know about each kind of task, behind one small interface.

The training loop, the suite, MLflow logging and the registry are the same for every task; a `TaskKind` supplies
the rest: which model head to load, how a loaded split becomes model inputs, how a batch is padded, how a dev
split is scored, and which prediction files are written. Three kinds implement it:

- `SequenceKind`: sentence(-pair) classification and regression ([CLS] head; GLUE and users' CSV/TSV/JSONL);
- `TokenKind`: token classification, e.g. NER (a label per word; CoNLL/JSONL; seqeval's entity scores);
- `SpanKind`: extractive question answering (start/end logits; SQuAD v1.1/v2.0 and its official metrics).

`kind_of(task)` picks the kind from `TaskSpec.kind`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from tokenizers import Tokenizer
from torch import nn

from bertscale.finetune import metrics as M
from bertscale.finetune import ner, qa
from bertscale.finetune.encoding import Encoded, collate, encode_split, prepare_tokenizer
from bertscale.finetune.evaluation import Evaluation, predict, write_predictions
from bertscale.finetune.tagging import ner_metrics
from bertscale.finetune.tasks import Hparams, LoadedSplit, QaOptions, TaskSpec, load_test, subset
from bertscale.model import BertForQuestionAnswering, BertForSequenceClassification, BertForTokenClassification
from bertscale.model.hf import LoadReport, label_names, load_pretrained, read_config
from bertscale.tokenizer import special_ids

log = logging.getLogger(__name__)


class Split(Protocol):
    """Model inputs of one split: `len()` examples (windows, for long inputs) with their token lengths."""

    name: str

    def __len__(self) -> int: ...

    @property
    def lengths(self) -> list[int]: ...


class TaskKind(Protocol):
    """The per-kind part of fine-tuning."""

    def load_model(self, task: TaskSpec, path: str | Path, allow_pickle: bool) -> tuple[nn.Module, LoadReport]:
        """The checkpoint with this kind's head (fresh where the checkpoint has none)."""

    def encode(self, task: TaskSpec, split: LoadedSplit, tok: Tokenizer, hp: Hparams, limit: int | None,
               train: bool) -> Split:
        """A loaded split as model inputs (at most `limit` examples); `train` adds training targets."""

    def collate(self, task: TaskSpec, data: Any, indices: Sequence[int], pad_id: int) -> dict[str, torch.Tensor]:
        """A padded batch of the examples `indices`, with their targets when the split has them."""

    def evaluate(self, model: nn.Module, task: TaskSpec, data: Any, pad_id: int, precision: str) -> Evaluation:
        """The task's metrics on a labelled split."""

    def write_dev(self, task: TaskSpec, data: Any, evaluation: Evaluation, out_dir: Path) -> dict[str, str]:
        """The dev predictions of `evaluation` as files (name -> path); {} where the kind writes none."""

    def write_test(self, model: nn.Module, task: TaskSpec, tok: Tokenizer, hp: Hparams, pad_id: int,
                   data_dir: str | Path | None, out_dir: Path, precision: str,
                   dev: Mapping[str, Evaluation]) -> dict[str, str]:
        """Predictions for the task's test files (name -> path); `dev` is the best epoch's evaluations."""

    def export_labels(self, task: TaskSpec) -> list[str] | None:
        """Output names for the HF config's id2label (None: HF's LABEL_i)."""

    def record(self, task: TaskSpec, dev: Mapping[str, Evaluation]) -> dict[str, Any]:
        """What the saved model's task record needs beyond name, kind, labels and metrics (serving reads it)."""


class SequenceKind:
    """Sentence(-pair) classification and regression: the pooled [CLS] token through a linear head."""

    def load_model(self, task: TaskSpec, path: str | Path, allow_pickle: bool) -> tuple[nn.Module, LoadReport]:
        return load_pretrained(path, BertForSequenceClassification, num_labels=task.num_labels,
                               allow_pickle=allow_pickle)

    def encode(self, task: TaskSpec, split: LoadedSplit, tok: Tokenizer, hp: Hparams, limit: int | None,
               train: bool) -> Encoded:
        return encode_split(subset(split.dataset, limit), prepare_tokenizer(tok, hp.max_length), split.name)

    def collate(self, task: TaskSpec, data: Encoded, indices: Sequence[int], pad_id: int) -> dict[str, torch.Tensor]:
        return collate(data, indices, pad_id, task.kind == "regression")

    def evaluate(self, model: nn.Module, task: TaskSpec, data: Encoded, pad_id: int, precision: str) -> Evaluation:
        preds = predict(model, data, pad_id, precision=precision)
        confusion = None
        if task.kind == "classification":
            confusion = M.confusion_matrix(data.labels, preds, range(task.num_labels)).tolist()
        return Evaluation(M.compute(task.metrics, data.labels, preds), confusion)

    def write_dev(self, task: TaskSpec, data: Encoded, evaluation: Evaluation, out_dir: Path) -> dict[str, str]:
        return {}

    def write_test(self, model: nn.Module, task: TaskSpec, tok: Tokenizer, hp: Hparams, pad_id: int,
                   data_dir: str | Path | None, out_dir: Path, precision: str,
                   dev: Mapping[str, Evaluation]) -> dict[str, str]:
        return write_predictions(model, task, prepare_tokenizer(tok, hp.max_length), pad_id, data_dir, out_dir,
                                 precision)

    def export_labels(self, task: TaskSpec) -> list[str] | None:
        return None

    def record(self, task: TaskSpec, dev: Mapping[str, Evaluation]) -> dict[str, Any]:
        return {"pair": task.labelled is not None and task.labelled.text_b is not None}


class TokenKind:
    """Token classification: a label per word from its first sub-word (`bertscale.finetune.ner`)."""

    def load_model(self, task: TaskSpec, path: str | Path, allow_pickle: bool) -> tuple[nn.Module, LoadReport]:
        model, report = load_pretrained(path, BertForTokenClassification, num_labels=task.num_labels,
                                        allow_pickle=allow_pickle)
        if "classifier.weight" not in report.missing:
            _align_tags(model, task, label_names(read_config(path)), path)
        return model, report

    def encode(self, task: TaskSpec, split: LoadedSplit, tok: Tokenizer, hp: Hparams, limit: int | None,
               train: bool) -> ner.Windows:
        return ner.encode(task, split, tok, special_ids(tok), hp.max_length, limit)

    def collate(self, task: TaskSpec, data: ner.Windows, indices: Sequence[int],
                pad_id: int) -> dict[str, torch.Tensor]:
        return ner.collate(data, indices, pad_id)

    def evaluate(self, model: nn.Module, task: TaskSpec, data: ner.Windows, pad_id: int,
                 precision: str) -> Evaluation:
        """Entity-level precision/recall/F1 (overall and per type) and token accuracy, as seqeval computes them."""
        assert data.gold is not None, f"{data.name} has no gold tags to evaluate against"
        predicted = ner.predict_tags(model, task, data, pad_id, precision)
        metrics, support = ner_metrics(data.gold, predicted)
        return Evaluation(metrics, details={"support": support, "sentences": len(data.idx)},
                          predictions=dict(zip(data.idx, predicted)))

    def write_dev(self, task: TaskSpec, data: ner.Windows, evaluation: Evaluation, out_dir: Path) -> dict[str, str]:
        path = ner.write_tagged(task, data.source, evaluation.predictions or {}, out_dir, data.name)
        return {data.name: str(path)}

    def write_test(self, model: nn.Module, task: TaskSpec, tok: Tokenizer, hp: Hparams, pad_id: int,
                   data_dir: str | Path | None, out_dir: Path, precision: str,
                   dev: Mapping[str, Evaluation]) -> dict[str, str]:
        written = {}
        for split in load_test(task, data_dir):
            data = ner.encode(task, split, tok, special_ids(tok), hp.max_length)
            tags = ner.predict_tags(model, task, data, pad_id, precision)
            written[split.name] = str(ner.write_tagged(task, split.source, dict(zip(data.idx, tags)), out_dir,
                                                       split.name))
        return written

    def export_labels(self, task: TaskSpec) -> list[str] | None:
        return list(task.labels)

    def record(self, task: TaskSpec, dev: Mapping[str, Evaluation]) -> dict[str, Any]:
        opt = task.tagging
        return {"tag_scheme": opt.scheme if opt else "iob2", "doc_stride": opt.doc_stride if opt else None}


def _align_tags(model: BertForTokenClassification, task: TaskSpec, names: list[str] | None, path: str | Path) -> None:
    """A tagger checkpoint whose config names its tags: rows reordered to the task's tag order when it has the same
    tags in another order; a head for other tags is re-initialised (its rows would mean other things)."""
    if names is None or names == list(task.labels):
        return
    with torch.no_grad():
        if sorted(names) == sorted(task.labels):
            order = [names.index(t) for t in task.labels]
            model.classifier.weight.copy_(model.classifier.weight[order].clone())
            model.classifier.bias.copy_(model.classifier.bias[order].clone())
            log.info("%s: classifier rows reordered from the checkpoint's tag order to %s's", path, task.name)
            return
        log.warning("%s: the checkpoint's tagger predicts %s, not %s's tags %s: its classifier is re-initialised",
                    path, names, task.name, list(task.labels))
        model.classifier.weight.normal_(0.0, model.config.initializer_range)
        model.classifier.bias.zero_()


class SpanKind:
    """Extractive question answering: start and end logits over the context (`bertscale.finetune.qa`)."""

    def load_model(self, task: TaskSpec, path: str | Path, allow_pickle: bool) -> tuple[nn.Module, LoadReport]:
        return load_pretrained(path, BertForQuestionAnswering, allow_pickle=allow_pickle)

    def encode(self, task: TaskSpec, split: LoadedSplit, tok: Tokenizer, hp: Hparams, limit: int | None,
               train: bool) -> qa.QaSplit:
        return qa.encode(task, split, tok, hp.max_length, limit, train)

    def collate(self, task: TaskSpec, data: qa.QaSplit, indices: Sequence[int],
                pad_id: int) -> dict[str, torch.Tensor]:
        return qa.collate(data, indices, pad_id)

    def evaluate(self, model: nn.Module, task: TaskSpec, data: qa.QaSplit, pad_id: int,
                 precision: str) -> Evaluation:
        metrics, details, predictions = qa.evaluate(model, task, data, pad_id, precision)
        return Evaluation(metrics, details=details, predictions=predictions)

    def write_dev(self, task: TaskSpec, data: qa.QaSplit, evaluation: Evaluation, out_dir: Path) -> dict[str, str]:
        found = evaluation.predictions or {}
        return qa.write_files(out_dir, data.name, found.get("predictions", {}), found.get("null_odds"))

    def write_test(self, model: nn.Module, task: TaskSpec, tok: Tokenizer, hp: Hparams, pad_id: int,
                   data_dir: str | Path | None, out_dir: Path, precision: str,
                   dev: Mapping[str, Evaluation]) -> dict[str, str]:
        written: dict[str, str] = {}
        for split in load_test(task, data_dir):
            data = qa.encode(task, split, tok, hp.max_length)
            starts, ends = qa.span_logits(model, data, pad_id, precision)
            threshold = qa.dev_threshold([e.details for e in dev.values()])
            predictions, null_odds = qa.answers(task, data, starts, ends, threshold)
            written.update(qa.write_files(out_dir, split.name, predictions,
                                          null_odds if data.version == "2.0" else None))
        return written

    def export_labels(self, task: TaskSpec) -> list[str] | None:
        return None

    def record(self, task: TaskSpec, dev: Mapping[str, Evaluation]) -> dict[str, Any]:
        opt = task.qa or QaOptions()
        versions = {e.details.get("version") for e in dev.values()} - {None}
        return {"squad_version": versions.pop() if len(versions) == 1 else opt.version,
                "null_threshold": qa.dev_threshold([e.details for e in dev.values()]), "doc_stride": opt.doc_stride,
                "max_query_length": opt.max_query_length, "max_answer_length": opt.max_answer_length,
                "n_best_size": opt.n_best_size}


KINDS: dict[str, TaskKind] = {"classification": SequenceKind(), "regression": SequenceKind(),
                              "token_classification": TokenKind(), "question_answering": SpanKind()}


def kind_of(task: TaskSpec) -> TaskKind:
    return KINDS[task.kind]
