"""The corpus stage: raw text in many formats -> cleaned, filtered, decontaminated, deduplicated, sentence-split
parquet shards.

`run_corpus(cfg)` runs it as an Apache Beam pipeline (local multi-processing by default; Dataflow, Flink or Spark
through `corpus.runner`); `run_plain(cfg)` runs the same graph on Beam's in-process runner. Both write
`<output>/shards/part-NNNNN.parquet`, `manifest.json`, `quarantine.jsonl` and `decontamination.jsonl`.
"""

from bertscale.corpus.cleaning import clean_text, decode_utf8
from bertscale.corpus.decontaminate import normalize
from bertscale.corpus.dedup import MinHasher, exact_key, lsh_params
from bertscale.corpus.eval_sets import eval_texts
from bertscale.corpus.filters import RULE_NAMES, build_rules, first_failed_rule
from bertscale.corpus.pipeline import CorpusResult, run_corpus, run_plain
from bertscale.corpus.readers import expand_inputs, plan_units, read_unit
from bertscale.corpus.sentences import split_sentences

__all__ = [
    "CorpusResult",
    "MinHasher",
    "RULE_NAMES",
    "build_rules",
    "clean_text",
    "decode_utf8",
    "eval_texts",
    "exact_key",
    "expand_inputs",
    "first_failed_rule",
    "lsh_params",
    "normalize",
    "plan_units",
    "read_unit",
    "run_corpus",
    "run_plain",
    "split_sentences",
]
