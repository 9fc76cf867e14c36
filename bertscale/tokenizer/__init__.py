"""WordPiece tokenizer stage: train on the corpus shards, save/load in the Hugging Face layout."""

from bertscale.tokenizer.wordpiece import (
    SPECIAL_TOKENS,
    CorpusStream,
    DatasetsEncoder,
    TokenizerResult,
    build_wordpiece,
    canonical_order,
    check_compatible,
    encode_batch_for_datasets,
    heldout_stats,
    load_tokenizer,
    resolve_corpus_files,
    save_tokenizer,
    special_ids,
    tokenizer_fingerprint,
    train_tokenizer,
    train_wordpiece,
)

__all__ = [
    "SPECIAL_TOKENS",
    "CorpusStream",
    "DatasetsEncoder",
    "TokenizerResult",
    "build_wordpiece",
    "canonical_order",
    "check_compatible",
    "encode_batch_for_datasets",
    "heldout_stats",
    "load_tokenizer",
    "resolve_corpus_files",
    "save_tokenizer",
    "special_ids",
    "tokenizer_fingerprint",
    "train_tokenizer",
    "train_wordpiece",
]
