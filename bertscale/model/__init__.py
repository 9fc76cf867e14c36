"""Our BERT (`bert.py`), Hugging Face interop (`hf.py`) and FLOP accounting for MFU (`flops.py`)."""

from __future__ import annotations

from bertscale.config import PipelineConfig
from bertscale.errors import ConfigError
from bertscale.model.bert import (
    SIZES,
    BertConfig,
    BertForPreTraining,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
    PretrainingOutput,
    num_parameters,
)

__all__ = [
    "SIZES",
    "BertConfig",
    "BertForPreTraining",
    "BertForQuestionAnswering",
    "BertForSequenceClassification",
    "BertForTokenClassification",
    "BertModel",
    "PretrainingOutput",
    "config_from_pipeline",
    "num_parameters",
]

# ModelConfig fields that override the named size when set (None = keep the size's value).
_SIZE_OVERRIDES = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
_COPIED = (
    "max_position_embeddings",
    "type_vocab_size",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "layer_norm_eps",
    "initializer_range",
)


def config_from_pipeline(cfg: PipelineConfig, vocab_size: int) -> BertConfig:
    """The model architecture of a pipeline run: `model.size` plus any explicit overrides in `cfg.model`.

    `vocab_size` is the tokenizer's; `model.vocab_size`, when set, must agree with it.
    """
    m = cfg.model
    if m.vocab_size is not None and m.vocab_size != vocab_size:
        raise ConfigError(
            f"model.vocab_size={m.vocab_size} differs from the tokenizer's vocabulary size {vocab_size}: "
            "unset model.vocab_size or retrain the tokenizer with tokenizer.vocab_size="
            f"{m.vocab_size}"
        )
    overrides = {k: getattr(m, k) for k in _SIZE_OVERRIDES if getattr(m, k) is not None}
    overrides.update({k: getattr(m, k) for k in _COPIED})
    return BertConfig.from_name(m.size, vocab_size=vocab_size, **overrides)
