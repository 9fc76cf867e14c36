"""Hugging Face interop: export our BERT to the HF layout and import any HF-format BERT checkpoint.

Our module names are HF's, so conversion is by name. The export writes `config.json` + `model.safetensors`
exactly as `transformers.BertForPreTraining.save_pretrained` would (the tied decoder weight and bias are left out
and re-tied on load). The import accepts a directory or a file, safetensors (single or sharded), keys with or
without the `bert.` prefix (and DDP/DeepSpeed's `module.`), old `LayerNorm.gamma/beta` names, and checkpoints of
HF's `BertModel`, `BertForMaskedLM`, `BertForPreTraining`, `BertForSequenceClassification`,
`BertForTokenClassification` and `BertForQuestionAnswering`. Parts the
checkpoint lacks (heads, pooler, classifier) keep their fresh initialisation and are reported, and so do heads of
another shape (a classifier with another number of labels, e.g. RTE started from an MNLI model). A checkpoint that
is not a BERT with absolute positions (RoBERTa, relative positions) or holds no BERT encoder weights is refused:
loading it would silently give a freshly initialised model. Pickle files (`.bin`, `.pt`) can run code when
loaded, so they are refused unless the caller passes `allow_pickle=True`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from bertscale.errors import BertscaleError, InputError
from bertscale.model.bert import (
    BertConfig,
    BertForPreTraining,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
)

log = logging.getLogger(__name__)

M = TypeVar("M", bound=nn.Module)

# Keys HF leaves out of the file because they are tied to another parameter.
TIED_KEYS = {"cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
             "cls.predictions.decoder.bias": "cls.predictions.bias"}
_BASE_PREFIXES = ("embeddings.", "encoder.", "pooler.")
# Task heads: their shape depends on the task (num_labels), so a mismatch means "another task", not "another model".
_HEAD_PREFIXES = ("classifier.", "cls.", "qa_outputs.")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_SAFETENSORS_NAMES = ("model.safetensors", "model.safetensors.index.json")
_PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt")


@dataclass
class LoadReport:
    """What `load_pretrained` did: keys the model had but the file lacked, keys the file had that the model does
    not use, and the modules left at their fresh initialisation."""

    source: str
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    initialised: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)  # head keys of another shape, dropped (so also missing)

    def summary(self) -> str:
        parts = [f"loaded {self.source}"]
        if self.initialised:
            parts.append(f"initialised {', '.join(self.initialised)}")
        if self.mismatched:
            parts.append(f"dropped {len(self.mismatched)} head weights of another shape ({', '.join(self.mismatched)})")
        if self.unexpected:
            parts.append(f"ignored {len(self.unexpected)} unused keys ({', '.join(self.unexpected[:4])}...)")
        return "; ".join(parts)


# The task record beside a fine-tuned model's weights: task name, kind, label names, whether it reads sentence
# pairs, hyper-parameters and scores (written by fine-tuning, read by the MLflow model of bertscale.serving).
FINETUNE_FILE = "bertscale_finetune.json"
HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def is_hf_dir(path: Path) -> bool:
    """Whether `path` is an HF-format model dir: a config.json beside safetensors (or pickled) weights."""
    return (path / "config.json").is_file() and any((path / n).is_file() for n in HF_WEIGHT_FILES)


# ----------------------------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------------------------
_ARCHITECTURES = {BertForPreTraining: "BertForPreTraining", BertModel: "BertModel",
                  BertForSequenceClassification: "BertForSequenceClassification",
                  BertForTokenClassification: "BertForTokenClassification",
                  BertForQuestionAnswering: "BertForQuestionAnswering"}
_LABELLED = (BertForSequenceClassification, BertForTokenClassification)


def hf_config_dict(model: nn.Module, labels: Sequence[str] | None = None) -> dict:
    """config.json contents: HF field names, model_type and architectures (execution options dropped); a
    classifier's `id2label`/`label2id` carry `labels` (e.g. a tagger's tag names), else HF's LABEL_i."""
    config: BertConfig = model.config
    data = config.architecture()
    data.update(model_type="bert", architectures=[_ARCHITECTURES.get(type(model), "BertForPreTraining")],
                tie_word_embeddings=True, dtype="float32")
    if isinstance(model, _LABELLED):
        names = list(labels) if labels else [f"LABEL_{i}" for i in range(model.num_labels)]
        if len(names) != model.num_labels:
            raise ValueError(f"{len(names)} label names for a head of {model.num_labels} outputs")
        data["num_labels"] = model.num_labels
        data["id2label"] = {str(i): name for i, name in enumerate(names)}
        data["label2id"] = {name: i for i, name in enumerate(names)}
    if isinstance(model, BertForSequenceClassification):
        data["problem_type"] = "regression" if model.num_labels == 1 else "single_label_classification"
    return data


def export_hf(model: nn.Module, out_dir: str | Path, labels: Sequence[str] | None = None) -> Path:
    """Write `config.json` + `model.safetensors` (fp32) that `transformers` loads with `from_pretrained`;
    `labels` names a classifier's outputs in config.json (id2label)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().contiguous().cpu() for k, v in model.state_dict().items() if k not in TIED_KEYS}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config_dict(model, labels), indent=2, sort_keys=True) + "\n")
    return out


def label_names(hf_config: dict) -> list[str] | None:
    """A checkpoint's output names in id order from config.json's id2label; None when there are none or they
    are HF's placeholders (LABEL_0, LABEL_1, ...), which say nothing about what the outputs mean."""
    id2label = hf_config.get("id2label") or {}
    try:
        names = [str(id2label[k]) for k in sorted(id2label, key=int)]
    except (TypeError, ValueError):
        return None
    if not names or all(n == f"LABEL_{i}" for i, n in enumerate(names)):
        return None
    return names


# ----------------------------------------------------------------------------------------------------------------
# Import
# ----------------------------------------------------------------------------------------------------------------
def _weight_files(path: Path, allow_pickle: bool) -> list[Path]:
    """The weight file(s) of a checkpoint dir or file; pickle only with consent."""
    if path.is_dir():
        found = [path / n for n in _SAFETENSORS_NAMES if (path / n).is_file()]
        if not found:
            pickled = [path / n for n in _PICKLE_NAMES if (path / n).is_file()]
            if not pickled:
                raise InputError(f"{path} holds no model.safetensors (or pytorch_model.bin): not an HF checkpoint")
            found = pickled
        path = found[0]
    if not path.is_file():
        raise InputError(f"checkpoint {path} does not exist")
    if path.name.endswith(_PICKLE_SUFFIXES) or path.name.endswith(".bin.index.json"):
        if not allow_pickle:
            raise BertscaleError(
                f"{path} is a pickle file, which can run arbitrary code when loaded; convert it to safetensors, "
                "or pass allow_pickle=True if you trust its origin"
            )
    if path.name.endswith(".index.json"):
        shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
        return [path.parent / s for s in shards]
    return [path]


def read_state_dict(path: str | Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """All tensors of an HF-format checkpoint (dir, file or sharded index), on CPU."""
    return _read_files(_weight_files(Path(path), allow_pickle))


def _read_files(files: list[Path]) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            if f.suffix == ".safetensors":
                state.update(load_file(str(f)))
            else:
                loaded = torch.load(f, map_location="cpu", weights_only=True)
                state.update(loaded.get("state_dict", loaded) if isinstance(loaded, dict) else loaded)
        except (SafetensorError, OSError) as e:
            raise InputError(f"cannot read weights file {f}: {e}; the file is damaged or incomplete (re-download "
                             "or re-export it)") from None
    return state


def read_config(path: str | Path) -> dict:
    """config.json next to (or inside) a checkpoint path; {} when there is none."""
    path = Path(path)
    cfg_file = path / "config.json" if path.is_dir() else path.parent / "config.json"
    if not cfg_file.is_file():
        return {}
    try:
        data = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{cfg_file} is not valid JSON: {e}") from None
    check_bert_config(data, cfg_file)
    return data


def check_bert_config(data: dict, where: Path) -> None:
    """Refuse configs of models that share BERT's key names but not its computation."""
    model_type = data.get("model_type", "bert")
    if model_type != "bert":
        raise InputError(
            f"{where}: model_type is {model_type!r}, but only BERT checkpoints (model_type 'bert') can be loaded; "
            "a RoBERTa/ALBERT/DistilBERT checkpoint differs in embeddings, tokenizer or layout"
        )
    positions = data.get("position_embedding_type", "absolute")
    if positions != "absolute":
        raise InputError(
            f"{where}: position_embedding_type is {positions!r}; our BERT implements only 'absolute' position "
            "embeddings, so this checkpoint would compute something else"
        )


def normalise_keys(state: dict[str, torch.Tensor], base_only: bool) -> dict[str, torch.Tensor]:
    """HF key variants -> our names: drop DDP/DeepSpeed's `module.`, add or strip the `bert.` prefix,
    gamma/beta -> weight/bias."""
    out = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        key = key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        if key.startswith(_BASE_PREFIXES):
            key = "bert." + key
        if base_only:
            if not key.startswith("bert."):
                out["<head>." + key] = value  # reported as unexpected: a BertModel has no heads
                continue
            key = key.removeprefix("bert.")
        out[key] = value
    # Some checkpoints store only the decoder's bias; ours lives in `cls.predictions.bias`.
    if "cls.predictions.decoder.bias" in out and "cls.predictions.bias" not in out:
        out["cls.predictions.bias"] = out["cls.predictions.decoder.bias"]
    for tied in TIED_KEYS:
        out.pop(tied, None)
    return out


def _build_model(model_cls: type[M], config: BertConfig | None, hf_config: dict, path: Path, **kw) -> M:
    if config is None:
        if not hf_config:
            raise InputError(f"no config.json at {path}: pass config=BertConfig(...) to load_pretrained")
        config = BertConfig.from_dict(hf_config)
    if model_cls in _LABELLED and "num_labels" not in kw:
        kw["num_labels"] = hf_config.get("num_labels") or len(hf_config.get("id2label") or {}) or 2
    return model_cls(config, **kw)


def _initialised_modules(missing: list[str]) -> list[str]:
    """Group missing parameter keys by module: 'cls.predictions.transform.dense.weight' -> 'cls.predictions'."""
    groups = []
    for key in missing:
        parts = key.split(".")
        name = ".".join(parts[:2]) if parts[0] in ("cls", "bert") else parts[0]
        if name not in groups:
            groups.append(name)
    return groups


def load_pretrained(
    path: str | Path,
    model_cls: type[M] = BertForPreTraining,
    config: BertConfig | None = None,
    allow_pickle: bool = False,
    **model_kwargs,
) -> tuple[M, LoadReport]:
    """Build `model_cls` from an HF-format BERT checkpoint (dir or weights file).

    The config comes from `config` or else the checkpoint's config.json (unknown HF fields ignored); extra
    keyword arguments go to the model (e.g. num_labels). Missing heads keep their fresh initialisation and are
    listed in the report; so do heads of another shape (dropped with a warning: fine-tuning starts a task from
    a model trained on another). Keys the model does not use are listed as unexpected. Shape mismatches in the
    encoder, and a checkpoint with no BERT encoder weights at all, are errors.
    """
    path = Path(path)
    files = _weight_files(path, allow_pickle)  # first, so that a wrong path or a pickle fails before anything else
    model = _build_model(model_cls, config, read_config(path), path, **model_kwargs)
    state = normalise_keys(_read_files(files), base_only=isinstance(model, BertModel))
    own = {k: v for k, v in model.state_dict().items() if k not in TIED_KEYS}
    mismatched = _mismatched_heads(state, own, path)
    usable = {k: v for k, v in state.items() if k in own and k not in mismatched}
    _check_encoder_loaded(usable, state, path)
    model.load_state_dict(usable, strict=False)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    missing = sorted(k for k in own if k not in usable)
    report = LoadReport(str(path), missing, sorted(k for k in state if k not in own), _initialised_modules(missing),
                        mismatched)
    log.info(report.summary())
    return model, report


def _mismatched_heads(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor], path: Path) -> list[str]:
    """Head keys whose shape differs from the model's (warned about, left initialised); any other key of another
    shape means another architecture, which is an error."""
    wrong = sorted(k for k, v in state.items() if k in own and own[k].shape != v.shape)
    for key in sorted(wrong, key=lambda k: k.startswith(_HEAD_PREFIXES)):  # an encoder mismatch is the error
        shapes = f"{key} has shape {tuple(state[key].shape)} but the model expects {tuple(own[key].shape)}"
        if not key.startswith(_HEAD_PREFIXES):
            raise InputError(f"{path}: {shapes}; check the config (vocab size, hidden size, num_labels) matches "
                             "the checkpoint")
        log.warning("%s: %s (another task's head?): left freshly initialised", path, shapes)
    return wrong


def _check_encoder_loaded(usable: dict[str, torch.Tensor], state: dict[str, torch.Tensor], path: Path) -> None:
    """Nothing of the encoder matched: the keys are another model's (e.g. `roberta.`), not a BERT to load."""
    if any(k.removeprefix("bert.").startswith(("embeddings.", "encoder.")) for k in usable):
        return
    prefixes = sorted({k.split(".")[0] for k in state})
    raise InputError(
        f"{path}: none of its {len(state)} weights is a BERT embedding or encoder weight (key prefixes: "
        f"{', '.join(prefixes[:6]) or 'none'}); expected keys like bert.encoder.layer.0... or encoder.layer.0...: "
        "only BERT checkpoints (BertModel, BertFor*) can be loaded"
    )
