"""Registered models as MLflow models: a `mlflow.pyfunc` model over our own BERT, so that
`mlflow.pyfunc.load_model("models:/<name>@champion")`, `mlflow models serve` and MLflow's deployment tools work
on what the pipeline registers.

The HF-format directory (weights, config.json, tokenizer files, and for fine-tuned models the task record
`bertscale_finetune.json`) is the model's one artifact, and the `bertscale` package travels with it as code, so
the model loads where bertscale is not installed (with torch, tokenizers, safetensors, numpy, scipy, pandas and
MLflow: the tagger and question answering models decode with the fine-tuning package's own functions).

What `predict` takes and returns (a pandas DataFrame in, a DataFrame out):
- a fine-tuned classifier: columns `text` (and `text_pair` for sentence-pair tasks) -> `label` (the class
  name) and `score` (its softmax probability); a regressor -> `score` (the predicted value). The same numbers as
  the fine-tuning run's own predictions in fp32.
- a tagger (token classification, e.g. NER): `text`, split into words at whitespace -> `tags` (one per word) and
  `entities` (`entity` type, `start_word`, `end_word` inclusive, `text`), decoded as seqeval does; long texts
  go through the same overlapping windows as fine-tuning.
- a question answering model: `question` and `context` -> `answer` (a span of the context; "" when a SQuAD 2.0
  model's null odds exceed the threshold tuned on dev) and `score` (the answer's start + end logit minus the
  no-answer score: positive when the model prefers the answer to no answer).
- the pretrained encoder: `text` -> fill-mask predictions (the default: every `[MASK]` in the text, with its
  `top_k` tokens and probabilities, and the text with each mask filled by its best token), or with
  `params={"output": "embedding"}` the mean of the last hidden states over the tokens. Fill-mask is the default
  because it is what an MLM encoder is trained to do and what a person can read to judge it; embeddings are
  one parameter away for the feature-extraction use.

A malformed input (a missing column, a null or non-string text, no mask in a fill-mask request) raises an
MlflowException with INVALID_PARAMETER_VALUE, which the scoring server answers with a 400 and the message.
"""

from __future__ import annotations

import json
import logging
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow.models
import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
from mlflow.types.schema import Array, Object, Property
from tokenizers import Tokenizer

from bertscale.errors import BertscaleError
from bertscale.finetune import ner, qa
from bertscale.finetune.squad import SquadSet, decode, make_features
from bertscale.finetune.tasks import QaOptions
from bertscale.resources import resource
from bertscale.model.bert import (
    BertForPreTraining,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
)
from bertscale.model.hf import FINETUNE_FILE, is_hf_dir, load_pretrained, read_config

log = logging.getLogger(__name__)

ARTIFACT = "model"  # the key of the HF dir among the pyfunc's artifacts
TOKENIZER, SPECIALS = "tokenizer.json", "special_tokens_map.json"
BATCH_SIZE = 32
FILL_MASK, EMBEDDING = "fill-mask", "embedding"
# What the model needs at load time (the bertscale package itself is logged as code).
REQUIREMENTS = ("torch", "tokenizers", "safetensors", "numpy", "scipy", "pandas", "pyarrow", "pydantic", "pyyaml",
                "tqdm", "mlflow")
TAGGER, READER = "tagger", "question-answering"
_KINDS = {"regression": "regressor", "token_classification": TAGGER, "question_answering": READER}


def model_kind(hf_dir: Path) -> str:
    """`classifier`, `regressor`, `tagger`, `question-answering` or `encoder`, from the dir's fine-tuning record
    (none: a pretrained encoder)."""
    task = task_record(hf_dir)
    if task is None:
        return "encoder"
    return _KINDS.get(task["kind"], "classifier")


def special_token(hf_dir: Path, key: str) -> str:
    """The text of a special token (`pad`, `mask`, ...) from the HF layout's special_tokens_map.json."""
    token = json.loads((hf_dir / SPECIALS).read_text()).get(f"{key}_token")
    token = token.get("content") if isinstance(token, dict) else token
    if not token:
        raise BertscaleError(f"{hf_dir / SPECIALS} names no {key}_token")
    return token


def special_tokens(hf_dir: Path, tokenizer: Tokenizer) -> tuple[str, dict[str, int]]:
    """The mask token's text, and the ids of pad, mask, cls, sep and unk in the tokenizer's vocabulary."""
    ids: dict[str, int] = {}
    for key in ("pad", "mask", "cls", "sep", "unk"):
        token_id = tokenizer.token_to_id(special_token(hf_dir, key))
        if token_id is None:
            raise BertscaleError(f"{hf_dir}: the {key} token {special_token(hf_dir, key)!r} is not in the vocabulary")
        ids[key] = token_id
    return special_token(hf_dir, "mask"), ids


def task_record(hf_dir: Path) -> dict[str, Any] | None:
    path = hf_dir / FINETUNE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


class BertscaleModel(mlflow.pyfunc.PythonModel):
    """The pyfunc: loads the HF dir of its `model` artifact with bertscale's loader and predicts on DataFrames."""

    def load_context(self, context: Any) -> None:
        self.load(Path(context.artifacts[ARTIFACT]))

    def load(self, hf_dir: Path) -> BertscaleModel:
        missing = [n for n in ("config.json", TOKENIZER, SPECIALS) if not (hf_dir / n).is_file()]
        if missing or not is_hf_dir(hf_dir):
            raise BertscaleError(f"the model's artifact {hf_dir} is incomplete: missing "
                                 f"{', '.join(missing) or 'the weights (model.safetensors)'}")
        self.task = task_record(hf_dir)
        self.kind = model_kind(hf_dir)
        self.tokenizer = Tokenizer.from_file(str(hf_dir / TOKENIZER))
        self.mask_token, self.ids = special_tokens(hf_dir, self.tokenizer)
        max_length = int((self.task or {}).get("hparams", {}).get("max_length")
                         or read_config(hf_dir).get("max_position_embeddings", 512))
        self.tokenizer.no_padding()
        if self.kind not in (TAGGER, READER):  # those cut long inputs into windows instead
            self.tokenizer.enable_truncation(max_length, strategy="longest_first")
        self.max_length = max_length
        if self.task is None:
            self.model, _ = load_pretrained(hf_dir, BertForPreTraining)
        elif self.kind == TAGGER:
            self.model, _ = load_pretrained(hf_dir, BertForTokenClassification, num_labels=len(self.task["labels"]))
        elif self.kind == READER:
            self.model, _ = load_pretrained(hf_dir, BertForQuestionAnswering)
        else:
            labels = self.task.get("labels") or []
            self.model, _ = load_pretrained(hf_dir, BertForSequenceClassification, num_labels=len(labels) or 1)
        self.model.eval()
        return self

    # No type hints on the inputs: MLflow would infer a signature from them; the logged one is explicit.
    def predict(self, context, model_input, params=None) -> pd.DataFrame:  # noqa: ANN001
        frame = as_frame(model_input)
        params = params or {}
        if self.kind == TAGGER:
            return self._tag(frame)
        if self.kind == READER:
            return self._answer(frame)
        if self.task is not None:
            return self._classify(frame)
        output = params.get("output", FILL_MASK)
        if output == EMBEDDING:
            return self._embed(frame)
        if output == FILL_MASK:
            return self._fill_mask(frame, int(params.get("top_k", 5)))
        raise _bad(f"params.output must be {FILL_MASK!r} or {EMBEDDING!r}, not {output!r}")

    # ------------------------------------------------------------------------------------------------------------
    def _encode(self, frame: pd.DataFrame, pair: bool) -> list[Any]:
        a = _texts(frame, "text")
        inputs: list[Any] = a
        if pair:
            inputs = list(zip(a, _texts(frame, "text_pair")))
        return self.tokenizer.encode_batch(inputs, add_special_tokens=True)

    def _batches(self, encodings: list[Any]):
        """(row indices, batch tensors) in length order, padded per batch, as fine-tuning evaluates."""
        order = sorted(range(len(encodings)), key=lambda i: len(encodings[i].ids))
        for start in range(0, len(order), BATCH_SIZE):
            rows = order[start : start + BATCH_SIZE]
            width = max(len(encodings[i].ids) for i in rows)
            ids = torch.full((len(rows), width), self.ids["pad"], dtype=torch.long)
            types = torch.zeros_like(ids)
            mask = torch.zeros_like(ids)
            for r, i in enumerate(rows):
                n = len(encodings[i].ids)
                ids[r, :n] = torch.tensor(encodings[i].ids)
                types[r, :n] = torch.tensor(encodings[i].type_ids)
                mask[r, :n] = 1
            yield rows, {"input_ids": ids, "token_type_ids": types, "attention_mask": mask}

    @torch.no_grad()
    def _classify(self, frame: pd.DataFrame) -> pd.DataFrame:
        pair = bool(self.task.get("pair")) or "text_pair" in frame.columns
        encodings = self._encode(frame, pair)
        regression = self.kind == "regressor"
        width = 1 if regression else len(self.task["labels"])
        logits = np.zeros((len(encodings), width), dtype=np.float32)
        for rows, batch in self._batches(encodings):
            logits[rows] = self.model(**batch)[1].float().numpy()
        if regression:
            return pd.DataFrame({"score": logits[:, 0].astype(np.float64)})
        probs = torch.softmax(torch.from_numpy(logits), -1).numpy()
        best = logits.argmax(-1)
        labels = [self.task["labels"][i] for i in best]
        return pd.DataFrame({"label": labels, "score": probs[np.arange(len(best)), best].astype(np.float64)})

    def _tag(self, frame: pd.DataFrame) -> pd.DataFrame:
        """Tags and entities per row, through fine-tuning's own windows and decoding (fp32)."""
        words = [t.split() for t in _texts(frame, "text")]
        labels = list(self.task["labels"])
        data = ner.encode_sentences("serve", [str(i) for i in range(len(words))], words, None, self.tokenizer,
                                    self.ids, self.max_length, self.task.get("doc_stride"), {})
        tags = ner.tags_from_logits(data, ner.window_logits(self.model, data, self.ids["pad"], "fp32", BATCH_SIZE),
                                    labels)
        return pd.DataFrame({"entities": [ner.entities(w, t) for w, t in zip(words, tags)], "tags": tags})

    def _answer(self, frame: pd.DataFrame) -> pd.DataFrame:
        """The best span per row, decoded as fine-tuning decodes dev and test questions (fp32)."""
        questions, contexts = _texts(frame, "question"), _texts(frame, "context")
        empty = [i for i, (q, c) in enumerate(zip(questions, contexts)) if not q.strip() or not c.strip()]
        if empty:
            raise _bad(f"rows {empty[:10]} have an empty question or context; both are needed to find an answer")
        opt = QaOptions(self.task.get("squad_version", "1.1"), self.task.get("doc_stride"),
                        int(self.task.get("max_query_length", 64)), int(self.task.get("max_answer_length", 30)),
                        int(self.task.get("n_best_size", 20)))
        version = "2.0" if self.task.get("squad_version") == "2.0" else "1.1"
        examples = SquadSet(Path("<request>"), version, [qa.example(q, c, str(i)) for i, (q, c)
                                                         in enumerate(zip(questions, contexts))])
        features = make_features(examples.examples, self.tokenizer, self.max_length,
                                 qa.doc_stride(opt, self.max_length), opt.max_query_length)
        data = qa.QaSplit("serve", examples, features)
        starts, ends = qa.span_logits(self.model, data, self.ids["pad"], "fp32", BATCH_SIZE)
        threshold = float(self.task.get("null_threshold") or 0.0) if version == "2.0" else None
        answers, null_odds = decode(examples, features, starts, ends, opt.n_best_size, opt.max_answer_length,
                                    threshold=threshold, version=version)
        ids = [str(i) for i in range(len(questions))]
        return pd.DataFrame({"answer": [answers[i] for i in ids],
                             "score": [-float(null_odds[i]) for i in ids]})

    @torch.no_grad()
    def _embed(self, frame: pd.DataFrame) -> pd.DataFrame:
        encodings = self._encode(frame, pair=False)
        out: list[list[float]] = [[] for _ in encodings]
        for rows, batch in self._batches(encodings):
            hidden, _ = self.model.bert(**batch)
            mask = batch["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden.float() * mask).sum(1) / mask.sum(1)
            for r, i in enumerate(rows):
                out[i] = pooled[r].tolist()
        return pd.DataFrame({"embedding": out})

    @torch.no_grad()
    def _fill_mask(self, frame: pd.DataFrame, top_k: int) -> pd.DataFrame:
        if top_k < 1:
            raise _bad(f"params.top_k must be at least 1, not {top_k}")
        encodings = self._encode(frame, pair=False)
        mask_id = self.ids["mask"]
        no_mask = [i for i, e in enumerate(encodings) if mask_id not in e.ids]
        if no_mask:
            raise _bad(f"rows {no_mask[:10]} have no {self.mask_token} token to fill; put one where a word "
                       f"should be predicted, or ask for params={{'output': '{EMBEDDING}'}}")
        tokens: list[list[list[str]]] = [[] for _ in encodings]
        scores: list[list[list[float]]] = [[] for _ in encodings]
        sequences = [""] * len(encodings)
        for rows, batch in self._batches(encodings):
            logits = self.model(**batch).mlm_logits.float()  # [B, T, V]
            for r, i in enumerate(rows):
                ids = list(encodings[i].ids)
                for pos in [p for p, t in enumerate(ids) if t == mask_id]:
                    p, top = torch.softmax(logits[r, pos], -1).topk(min(top_k, logits.shape[-1]))
                    tokens[i].append([self.tokenizer.id_to_token(int(t)) for t in top])
                    scores[i].append([float(x) for x in p])
                    ids[pos] = int(top[0])
                sequences[i] = self.tokenizer.decode(ids, skip_special_tokens=True)
        return pd.DataFrame({"sequence": sequences, "tokens": tokens, "scores": scores})


def _bad(message: str) -> MlflowException:
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def as_frame(model_input: Any) -> pd.DataFrame:
    """The input as a DataFrame: a DataFrame, a dict of columns, a list of records, or a list of texts."""
    if isinstance(model_input, pd.DataFrame):
        return model_input
    if isinstance(model_input, dict):
        return pd.DataFrame(model_input)
    if isinstance(model_input, (list, tuple)) and all(isinstance(x, str) for x in model_input):
        return pd.DataFrame({"text": list(model_input)})
    if isinstance(model_input, (list, tuple)) and all(isinstance(x, dict) for x in model_input):
        return pd.DataFrame(list(model_input))
    raise _bad(f"expected a table with a 'text' column, got {type(model_input).__name__}")


def _texts(frame: pd.DataFrame, column: str) -> list[str]:
    if column not in frame.columns:
        raise _bad(f"the input has no {column!r} column (it has {list(frame.columns)})")
    values = frame[column].tolist()
    bad = [i for i, v in enumerate(values) if not isinstance(v, str)]
    if bad:
        raise _bad(f"column {column!r}: rows {bad[:10]} are not strings ({values[bad[0]]!r} in row {bad[0]})")
    return values


# ----------------------------------------------------------------------------------------------------------------
# Logging
# ----------------------------------------------------------------------------------------------------------------
def signature_and_example(hf_dir: Path) -> tuple[ModelSignature, pd.DataFrame]:
    kind = model_kind(hf_dir)
    if kind == "encoder":
        example = pd.DataFrame({"text": [f"The capital of France is {special_token(hf_dir, 'mask')}."]})
        params = ParamSchema([ParamSpec("output", "string", FILL_MASK), ParamSpec("top_k", "long", 5)])
        return ModelSignature(Schema([ColSpec("string", "text")]), params=params), example
    task = task_record(hf_dir) or {}
    if kind == TAGGER:
        entity = Object([Property("entity", "string"), Property("start_word", "long"), Property("end_word", "long"),
                         Property("text", "string")])
        return (ModelSignature(Schema([ColSpec("string", "text")]),
                               Schema([ColSpec(Array(entity), "entities"), ColSpec(Array("string"), "tags")])),
                pd.DataFrame({"text": ["Peter Blackburn visited Brussels ."]}))
    if kind == READER:
        return (ModelSignature(Schema([ColSpec("string", "question"), ColSpec("string", "context")]),
                               Schema([ColSpec("string", "answer"), ColSpec("double", "score")])),
                pd.DataFrame({"question": ["Who visited Brussels?"],
                              "context": ["Peter Blackburn visited Brussels in August."]}))
    columns = [ColSpec("string", "text")]
    example = {"text": ["A short example sentence."]}
    if task.get("pair"):
        columns.append(ColSpec("string", "text_pair"))
        example["text_pair"] = ["Another sentence."]
    outputs = [ColSpec("double", "score")] if kind == "regressor" else [ColSpec("string", "label"),
                                                                          ColSpec("double", "score")]
    return ModelSignature(Schema(columns), Schema(outputs)), pd.DataFrame(example)


def requirements() -> list[str]:
    """Pinned to this environment's versions, as MLflow's own inference would (without loading the model)."""
    out = []
    for name in REQUIREMENTS:
        try:
            out.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            out.append(name)
    return out


def declare_model() -> None:
    """Hand MLflow the model object (called by resources/mlflow_model.py when MLflow loads a model)."""
    mlflow.models.set_model(BertscaleModel())


def log_model(hf_dir: str | Path, name: str = "model") -> Any:
    """Log `hf_dir` as a pyfunc model into the active run; returns MLflow's ModelInfo (its `model_uri`)."""
    hf_dir = Path(hf_dir)
    BertscaleModel().load(hf_dir)  # fail here, with what is missing, rather than when someone loads it
    signature, example = signature_and_example(hf_dir)
    package = Path(__file__).resolve().parent
    return mlflow.pyfunc.log_model(
        name=name, python_model=str(resource("mlflow_model.py")), artifacts={ARTIFACT: str(hf_dir)}, signature=signature,
        input_example=example, pip_requirements=requirements(), code_paths=[str(package)],
        metadata={"bertscale.kind": model_kind(hf_dir)},
    )


def hf_dir_of(local: Path) -> Path:
    """The HF dir inside a downloaded MLflow model (its `model` artifact), or `local` itself when it is one
    (versions registered before models were logged as MLflow models)."""
    if (local / "MLmodel").is_file():
        from mlflow.models import Model

        conf = Model.load(str(local / "MLmodel")).flavors.get("python_function", {})
        artifact = (conf.get("artifacts") or {}).get(ARTIFACT, {})
        path = artifact.get("path") if isinstance(artifact, dict) else None
        if path and (local / path).is_dir():
            return local / path
        raise BertscaleError(f"{local} is an MLflow model without bertscale's {ARTIFACT!r} artifact")
    return local
