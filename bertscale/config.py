"""Typed configuration for every stage.

One nested model describes a whole pipeline run. YAML files in `configs/` hold overrides only; precedence is
CLI (`--set a.b=value`) > file > defaults. Unknown keys and invalid values are rejected with a message that names
the field and what is allowed.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from bertscale.errors import ConfigError


class Section(BaseModel):
    """Base for config sections: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def is_uri(path: str) -> bool:
    """A Beam filesystem URI (gs://, s3://, hdfs://...) rather than a local path."""
    return "://" in path


# ----------------------------------------------------------------------------------------------------------------
# Tracking
# ----------------------------------------------------------------------------------------------------------------
class TrackingConfig(Section):
    tracking_uri: str | None = Field(None, description="MLflow tracking URI; None = sqlite:///<workdir>/mlflow.db.")
    experiment: str = Field("bertscale", description="MLflow experiment name.")
    enabled: bool = Field(True, description="Log params, metrics and artifacts to MLflow.")


# ----------------------------------------------------------------------------------------------------------------
# Corpus
# ----------------------------------------------------------------------------------------------------------------
class FilterConfig(Section):
    """Document filters in the spirit of Gopher/C4. A threshold of None disables that rule."""

    min_chars: int | None = Field(200, ge=0, description="Drop documents shorter than this many characters.")
    max_chars: int | None = Field(5_000_000, ge=1, description="Drop documents longer than this many characters.")
    min_words: int | None = Field(30, ge=0, description="Drop documents with fewer words.")
    min_alpha_ratio: float | None = Field(
        0.6, ge=0, le=1, description="Min fraction of words containing an alphabetic character (Gopher: 0.8)."
    )
    min_mean_word_length: float | None = Field(2.5, ge=0, description="Min mean word length (Gopher: 3).")
    max_mean_word_length: float | None = Field(12.0, ge=0, description="Max mean word length (Gopher: 10).")
    min_punct_line_ratio: float | None = Field(
        None, ge=0, le=1, description="Min fraction of lines ending in terminal punctuation (C4-style)."
    )
    max_dup_line_ratio: float | None = Field(
        0.3, ge=0, le=1, description="Max fraction of lines that repeat an earlier line (Gopher: 0.3)."
    )
    max_dup_paragraph_ratio: float | None = Field(
        0.3, ge=0, le=1, description="Max fraction of paragraphs that repeat an earlier paragraph (Gopher: 0.3)."
    )


class DedupConfig(Section):
    exact: bool = Field(True, description="Drop exact duplicates (hash of normalized text); the smallest doc id is kept.")
    near: bool = Field(True, description="Drop near duplicates with MinHash + LSH.")
    threshold: float = Field(0.8, gt=0, le=1, description="Jaccard similarity above which two documents are near duplicates.")
    num_perm: int = Field(128, ge=8, le=1024, description="MinHash permutations.")
    shingle_size: int = Field(5, ge=1, le=32, description="Word n-gram size of the shingles.")
    seed: int = Field(1, description="Seed of the MinHash permutations.")
    cluster_rounds: int = Field(
        2, ge=0, le=32,
        description="Min-label propagation rounds run as Beam shuffles; edges still unresolved after them are "
        "finished by one union-find (reported as near_dedup.unconverged_edges in the manifest).",
    )


class RunnerConfig(Section):
    runner: str = Field(
        "DirectRunner",
        description="Beam runner: DirectRunner (local, multi-processing), DataflowRunner, FlinkRunner, SparkRunner...",
    )
    num_workers: int | None = Field(None, ge=1, description="Local worker processes; None = number of cores.")
    pipeline_options: list[str] = Field(
        default_factory=list, description="Extra Beam pipeline options, e.g. ['--project=p', '--region=r']."
    )
    setup_file: str | None = Field(
        "auto", description="setup.py that remote workers install bertscale from; auto = this source tree's when "
        "a remote runner gets no requirements file, container image or --setup_file; None = never."
    )
    requirements_file: str | None = Field(None, description="requirements.txt remote workers install.")
    sdk_container_image: str | None = Field(
        None, description="Worker image with bertscale installed (deploy/Dockerfile, target beam-worker)."
    )


_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.\- ]*$"  # becomes part of metric names: letters, digits, _ . - and spaces


class EvalFileConfig(Section):
    """An evaluation file whose texts must not be in the pretraining corpus."""

    task: str = Field(pattern=_NAME, description="Task name, as counted in the manifest (e.g. SST-2).")
    split: str = Field("dev", pattern=_NAME, description="Split name, as reported (dev, test, dev_matched...).")
    path: str = Field(description="The file (a local path or a Beam URI); the stage's launcher reads it.")
    format: Literal["glue-tsv", "csv", "tsv", "jsonl", "conll", "squad"] = Field(
        description="glue-tsv: tabs, no quoting, columns by index; csv/tsv/jsonl: columns by name (a JSONL list "
        "of tokens is joined); conll: one token per line, blank lines between sentences; squad: SQuAD JSON "
        "(every context and question).")
    text_columns: list[int | str] = Field(
        default_factory=list, description="Columns holding text: 0-based indices for glue-tsv, names for "
        "csv/tsv/jsonl, the token column for conll (default 0); none for squad.")
    header: bool = Field(True, description="glue-tsv: the first line is a header (CoLA's train/dev have none).")

    @model_validator(mode="after")
    def _columns_fit_the_format(self) -> "EvalFileConfig":
        cols, where = self.text_columns, f"eval file {self.path}"
        if self.format == "squad" and cols:
            raise ValueError(f"{where}: squad files need no text_columns (contexts and questions are read)")
        if self.format == "conll" and (len(cols) > 1 or any(not isinstance(c, int) for c in cols)):
            raise ValueError(f"{where}: conll takes at most one text column, the token column's index")
        if self.format in ("glue-tsv", "csv", "tsv", "jsonl") and not cols:
            raise ValueError(f"{where}: format {self.format} needs text_columns")
        want = int if self.format == "glue-tsv" else str
        if self.format in ("glue-tsv", "csv", "tsv", "jsonl") and any(not isinstance(c, want) for c in cols):
            raise ValueError(f"{where}: format {self.format} takes text_columns as "
                             + ("0-based indices" if want is int else "column names"))
        return self


class DecontaminationConfig(Section):
    """Corpus text sharing a long n-gram with an evaluation set is removed (GPT-3's 13-gram overlap check)."""

    enabled: bool = Field(True, description="Check the corpus against eval_files (nothing to do while it is empty).")
    ngram: int = Field(13, ge=3, le=64, description="Words in a matching n-gram, after normalisation (lower "
                       "case, no punctuation or diacritics).")
    mode: Literal["document", "passage"] = Field(
        "document", description="document: drop a matching document; passage: drop the sentences a matching "
        "n-gram touches and keep the rest (dropped whole if what is left fails the filters).")
    eval_files: list[EvalFileConfig] = Field(
        default_factory=list, description="The evaluation and test files; the pipeline flow fills it from the "
        "fine-tuning tasks (bertscale.lineage.task_eval_files).")


class CorpusConfig(Section):
    inputs: list[str] = Field(default_factory=list, description="Paths, directories, globs or Beam URIs (gs://, s3://).")
    output: str | None = Field(None, description="Output directory; None = <workdir>/corpus.")
    format: Literal["auto", "txt", "jsonl", "parquet", "wikiextractor"] = Field(
        "auto", description="Input format; auto = by file extension (and <doc> sniffing for WikiExtractor)."
    )
    txt_mode: Literal["file", "blank_line"] = Field(
        "file", description="Plain text: one document per file, or documents separated by blank lines."
    )
    text_field: str = Field("text", description="JSONL field holding the text.")
    parquet_column: str = Field("text", description="Parquet column holding the text.")
    normalization: Literal["NFC", "NFKC", "NFD", "NFKD", "none"] = Field("NFC", description="Unicode normal form.")
    strip_markup: bool = Field(True, description="Remove HTML/wiki markup remnants.")
    filters: FilterConfig = Field(default_factory=FilterConfig)
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    min_sentence_chars: int = Field(1, ge=1, description="Sentences shorter than this are merged into a neighbour.")
    target_shard_bytes: int = Field(64 * 2**20, ge=1024, description="Approximate text bytes per output shard.")
    max_doc_bytes: int = Field(
        64 * 2**20, ge=1024, description="Documents larger than this are quarantined (bounds worker memory)."
    )
    max_invalid_utf8_ratio: float = Field(
        0.01, ge=0, le=1,
        description="Documents with more invalid UTF-8 bytes than this fraction are quarantined; below it the "
        "invalid bytes are dropped and counted.",
    )
    bundle_bytes: int = Field(
        4 * 2**20, ge=1024, description="Line-based files (uncompressed, BGZF gzip, multi-frame or seekable zstd) "
        "are split into work units of about this many bytes of text."
    )
    work_dir: str | None = Field(
        None, description="Intermediate files written by the workers (a URI every worker can reach on a cluster, "
        "e.g. gs://bucket/tmp); None = <output>/_work, removed after a successful run.",
    )
    decontamination: DecontaminationConfig = Field(default_factory=DecontaminationConfig)
    runner: RunnerConfig = Field(default_factory=RunnerConfig)


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------------------------
class TokenizerConfig(Section):
    output: str | None = Field(None, description="Output directory; None = <workdir>/tokenizer.")
    pretrained: str | None = Field(None, description="Use an existing HF tokenizer dir instead of training one.")
    vocab_size: int = Field(30522, ge=16, description="WordPiece vocabulary size (incl. special tokens).")
    min_frequency: int = Field(2, ge=1, description="Minimum pair frequency for a merge.")
    limit_alphabet: int | None = Field(1000, ge=1, description="Max distinct initial characters kept.")
    lowercase: bool = Field(True, description="Uncased model (lowercase + accent stripping by default).")
    strip_accents: bool | None = Field(None, description="None = follow `lowercase` (as BERT does).")
    handle_chinese_chars: bool = Field(True, description="Split CJK characters into single tokens.")
    batch_size: int = Field(1000, ge=1, description="Documents per batch while streaming shards to the trainer.")
    sample_bytes: int | None = Field(
        2**29, ge=1, description="Train on a seeded random sample of about this many bytes of text (None = all "
        "of it). Bounds the trainer's time and memory, which grow with the text trained on; half a gigabyte "
        "holds far more than a 30K-piece vocabulary needs (SentencePiece samples its input the same way).")
    heldout_docs: int = Field(200, ge=0, description="Documents held out for [UNK]-rate and tokens-per-word stats.")
    heldout_seed: int = Field(0, description="Seed of the random sample of held-out documents.")
    text_column: str = Field("text", description="Parquet column holding each document's text.")


# ----------------------------------------------------------------------------------------------------------------
# Pretraining data
# ----------------------------------------------------------------------------------------------------------------
MIN_SEQ_LEN, MAX_SEQ_LEN = 8, 65535


class DataConfig(Section):
    output: str | None = Field(None, description="Output directory; None = <workdir>/data.")
    mode: Literal["nsp", "packed"] = Field("nsp", description="Devlin-style sentence pairs with NSP, or packed sequences.")
    seq_lengths: list[int] = Field(
        default_factory=lambda: [128], min_length=1, description="One output per phase, e.g. [128, 512]."
    )
    short_seq_prob: float = Field(0.1, ge=0, le=1, description="Probability of a shorter target length (NSP mode).")
    dupe_factor: int = Field(1, ge=1, description="Passes over the corpus with different pairings.")
    heldout_fraction: float = Field(0.01, ge=0, lt=1, description="Fraction of documents held out for evaluation.")
    num_proc: int | None = Field(None, ge=1, description="Tokenization processes; None = number of cores.")
    seed: int = Field(12345, description="Seed of pairing and shuffling.")
    mask_prob: float = Field(0.15, gt=0, lt=1, description="Fraction of tokens selected for MLM.")
    whole_word_mask: bool = Field(False, description="Mask all WordPieces of a word together.")
    max_unk_fraction: float | None = Field(
        0.5, ge=0, le=1, description="Skip documents with more [UNK] tokens than this fraction; None keeps all."
    )
    nsp_pool_documents: int = Field(
        20000, ge=2, description="Documents sampled across all corpus shards as the source of random NSP B "
        "segments (per split); bounds the stage's memory instead of the corpus size."
    )

    @model_validator(mode="after")
    def _valid_seq_lengths(self) -> "DataConfig":
        # [CLS] A [SEP] B [SEP] needs room for a few tokens of each segment; segment lengths are stored as uint16.
        bad = [n for n in self.seq_lengths if not MIN_SEQ_LEN <= n <= MAX_SEQ_LEN]
        if bad:
            raise ValueError(f"seq_lengths {bad} out of range: each must be {MIN_SEQ_LEN}..{MAX_SEQ_LEN}, "
                             "e.g. [128, 512]")
        if len(set(self.seq_lengths)) != len(self.seq_lengths):
            raise ValueError(f"seq_lengths {self.seq_lengths} repeats a length: list each phase once")
        return self


# ----------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------
class ModelConfig(Section):
    size: Literal["tiny", "mini", "small", "medium", "base", "large"] = Field("tiny", description="Named size.")
    vocab_size: int | None = Field(None, ge=16, description="None = the tokenizer's vocabulary size.")
    hidden_size: int | None = Field(None, ge=8, description="Override the named size's hidden size.")
    num_hidden_layers: int | None = Field(None, ge=1, description="Override the named size's layer count.")
    num_attention_heads: int | None = Field(None, ge=1, description="Override the named size's head count.")
    intermediate_size: int | None = Field(None, ge=8, description="Override the named size's FFN size.")
    max_position_embeddings: int = Field(512, ge=8, description="Longest sequence the model accepts.")
    type_vocab_size: int = Field(2, ge=1, description="Token type (segment) vocabulary size.")
    hidden_dropout_prob: float = Field(0.1, ge=0, lt=1, description="Dropout after embeddings and sublayers.")
    attention_probs_dropout_prob: float = Field(0.1, ge=0, lt=1, description="Dropout on attention weights.")
    layer_norm_eps: float = Field(1e-12, gt=0, description="LayerNorm epsilon.")
    initializer_range: float = Field(0.02, gt=0, description="Std of the normal initialisation.")


# ----------------------------------------------------------------------------------------------------------------
# Pretraining
# ----------------------------------------------------------------------------------------------------------------
class TrainConfig(Section):
    output: str | None = Field(None, description="Output directory (checkpoints, metrics, hf/); None = <workdir>/train.")
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="DeepSpeed ZeRO stage.")
    ds_config: str | None = Field(
        None, description="Base DeepSpeed JSON config; None = the shipped zero<stage>.json (configs/deepspeed/). Batch size, "
        "accumulation, clipping and precision always come from this section."
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto = bf16 where the device computes it natively (CUDA compute capability 8+, a CPU "
        "with AMX or AVX-512 BF16), else fp32; the run logs its choice. fp16 needs a GPU.")
    optimizer: Literal["adamw", "lamb"] = Field("adamw", description="LAMB only with ZeRO stage 0.")
    lr: float = Field(1e-4, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay (not on biases and LayerNorm).")
    betas: tuple[float, float] = Field((0.9, 0.999), description="Adam betas.")
    eps: float = Field(1e-6, gt=0, description="Adam epsilon.")
    warmup_steps: int = Field(100, ge=0, description="Linear warmup steps.")
    decay: Literal["linear", "polynomial", "constant"] = Field("linear", description="Decay after warmup.")
    poly_power: float = Field(1.0, gt=0, description="Power of the polynomial decay.")
    micro_batch_size: int = Field(32, ge=1, description="Sequences per rank per micro step.")
    grad_accum: int = Field(1, ge=1, description="Micro steps per optimizer step.")
    max_steps: int = Field(1000, ge=1, description="Optimizer steps (over all phases).")
    phase_steps: list[int] | None = Field(
        None, description="Steps per sequence-length phase (must sum to max_steps); None = all in the first phase."
    )
    max_minutes: float | None = Field(
        None, gt=0, description="Wall-clock budget: at it the run stops with a final checkpoint and the HF export "
        "(and the pipeline registers the encoder), as a completed run does.")
    document_attention: bool = Field(
        True, description="Packed sequences (data.mode=packed): each token attends only to its own document.")
    compile: bool | Literal["auto"] = Field(
        "auto", description="torch.compile the encoder's dense blocks (true/false); auto = on CUDA only (README).")
    grad_clip: float = Field(1.0, ge=0, description="Max global grad norm; 0 disables clipping.")
    eval_every: int = Field(200, ge=1, description="Evaluate on the held-out split every N steps.")
    eval_batches: int = Field(20, ge=1, description="Batches per evaluation.")
    log_every: int = Field(10, ge=1, description="Log metrics every N steps.")
    checkpoint_every: int = Field(500, ge=1, description="Checkpoint every N steps.")
    checkpoint_minutes: float | None = Field(None, gt=0, description="Also checkpoint every N minutes.")
    keep_checkpoints: int = Field(3, ge=1, description="Keep the last K checkpoints.")
    max_bad_steps: int = Field(10, ge=1, description="Abort after K consecutive non-finite losses.")
    peak_tflops: float | None = Field(None, gt=0, description="Peak TFLOP/s per device for MFU; None = per-device default.")
    seed: int = Field(42, description="Seed of init, masking and data order.")
    num_procs: int = Field(1, ge=1, description="Processes per node for `bertscale pretrain` (DeepSpeed launcher).")
    init_from: str | None = Field(
        None, description="Start a new run from these weights (continual pretraining): an HF-format BERT dir, a "
        "DeepSpeed checkpoint dir or models:/name@alias; the optimizer and schedule start fresh. Ignored when "
        "the run resumes from its own checkpoints."
    )
    resume: bool = Field(True, description="Resume from the latest checkpoint in `output` if there is one; "
                         "false: start at step 0, moving existing checkpoints to checkpoints/previous-<time>/.")
    collective_timeout_s: float = Field(
        1800.0, gt=0, description="Seconds a collective may wait for a peer before the rank stops with an error "
        "(a dead host or a cut network); also bounds the process-group start-up."
    )
    save_failures_tolerated: int = Field(
        1, ge=0, description="Failed checkpoint saves in a row (disk full, read-only) that only warn; one more "
        "stops the run. The final save must always succeed."
    )


# ----------------------------------------------------------------------------------------------------------------
# Fine-tuning
# ----------------------------------------------------------------------------------------------------------------
class CustomTaskConfig(Section):
    """A user's own task: sentence(-pair) classification or regression from CSV/TSV/JSONL columns, token
    classification (NER) from CoNLL or JSONL token lists, or extractive question answering from SQuAD JSON."""

    name: str = Field(description="Task name, used in finetune.tasks, tables and registered model names.")
    train: str = Field(description="Training file (.csv, .tsv, .jsonl, CoNLL, or SQuAD .json).")
    dev: str | None = Field(None, description="Dev file for evaluation and best-epoch selection.")
    test: str | None = Field(None, description="File to predict (GLUE's <name>.tsv; CoNLL/JSONL/predictions.json).")
    format: Literal["auto", "csv", "tsv", "jsonl", "conll", "squad"] = Field(
        "auto", description="auto = by kind and file suffix (.jsonl/.json: JSONL, else CoNLL; squad for QA).")
    text_a: str = Field("text_a", description="Column with the first (or only) text.")
    text_b: str | None = Field(None, description="Column with the second text of a pair task.")
    label: str = Field("label", description="Column with the label (class name or number).")
    index: str | None = Field(None, description="Column (JSONL: key) with row ids for predictions; None = row number.")
    kind: Literal["classification", "regression", "token_classification", "question_answering"] = Field(
        "classification", description="Head, loss, metrics and file layout.")
    labels: list[str] | None = Field(
        None, description="Class (or tag) names in id order; None = sorted training labels ('O' first for tags).")
    metrics: list[Literal["accuracy", "f1", "matthews", "pearson", "spearman"]] | None = Field(
        None, description="None = accuracy (classification) or Pearson + Spearman (regression).")
    tokens: str = Field("tokens", description="token_classification, JSONL: key of the list of tokens.")
    tags: str = Field("tags", description="token_classification, JSONL: key of the list of tags.")
    token_column: int = Field(0, description="token_classification, CoNLL: 0-based column of the token.")
    tag_column: int = Field(-1, description="token_classification, CoNLL: column of the tag (-1 = the last).")
    tag_scheme: Literal["iob1", "iob2", "bioes"] = Field(
        "iob2", description="token_classification: tag prefixes allowed (IOB1/IOB2: B, I; BIOES: B, I, E, S).")
    doc_stride: int | None = Field(
        None, ge=0, description="Tokens shared by consecutive windows over long inputs (the tokenizer's stride); "
        "None = 128 for question answering (at most half a window's context), half the window for tagging.")
    squad_version: Literal["auto", "1.1", "2.0"] = Field(
        "auto", description="question_answering: auto = the file's `version` field (2.0 allows unanswerable).")
    max_length: int | None = Field(
        None, ge=8, description="Max tokens per example for this task (QA windows want 384); None = finetune.max_length.")
    max_query_length: int = Field(64, ge=1, description="question_answering: question tokens kept.")
    max_answer_length: int = Field(30, ge=1, description="question_answering: longest answer span, in tokens.")
    n_best_size: int = Field(20, ge=1, description="question_answering: start/end candidates per window.")

    @model_validator(mode="after")
    def _fields_fit_the_kind(self) -> "CustomTaskConfig":
        formats = {"classification": ("csv", "tsv", "jsonl"), "regression": ("csv", "tsv", "jsonl"),
                   "token_classification": ("conll", "jsonl"), "question_answering": ("squad",)}[self.kind]
        if self.format not in ("auto", *formats):
            raise ValueError(f"custom task {self.name}: format {self.format!r} does not fit kind {self.kind}; "
                             f"use auto or one of {', '.join(formats)}")
        only = {"classification": {"text_a", "text_b", "label", "metrics"},
                "token_classification": {"tokens", "tags", "token_column", "tag_column", "tag_scheme", "doc_stride"},
                "question_answering": {"squad_version", "max_query_length", "max_answer_length", "n_best_size",
                                       "doc_stride"}}
        only["regression"] = only["classification"]
        # A field of another kind set to a non-default value is a mistake (a dumped config repeats the defaults).
        foreign = sorted(k for k in set().union(*only.values()) - only[self.kind]
                         if getattr(self, k) != type(self).model_fields[k].default)
        if foreign:
            raise ValueError(f"custom task {self.name}: {', '.join(foreign)} not used by kind {self.kind}; remove "
                             "them or set the kind they belong to")
        if self.kind == "regression" and self.labels:
            raise ValueError(f"custom task {self.name}: labels do not apply to a regression task")
        return self


class FinetuneConfig(Section):
    output: str | None = Field(None, description="Output directory; None = <workdir>/finetune.")
    custom_tasks: list[CustomTaskConfig] = Field(default_factory=list, description="Your own tasks (see above).")
    grid_lr: list[float] = Field(default_factory=list, description="Learning rates to search; [] = no search.")
    grid_batch_size: list[int] = Field(default_factory=list, description="Batch sizes to search; [] = no search.")
    num_workers: int = Field(1, ge=1, description="Parallel processes for the grid search and seeds.")
    predict_test: bool = Field(True, description="Write test-set predictions in the GLUE submission format.")
    group_by_length: bool = Field(True, description="Batch examples of similar length (less padding).")
    glue_dir: str | None = Field(None, description="Directory with GLUE-format task folders (CoLA/, SST-2/...).")
    tasks: list[str] = Field(default_factory=lambda: ["RTE"], description="GLUE task names, or custom task names.")
    checkpoint: str | None = Field(None, description="HF dir, DeepSpeed checkpoint dir or models:/name@alias.")
    seeds: list[int] = Field(default_factory=lambda: [42], description="One run per seed; median reported.")
    lr: float | None = Field(None, gt=0, description="None = the task's default from the BERT paper.")
    batch_size: int | None = Field(None, ge=1, description="None = the task's default.")
    epochs: float | None = Field(None, gt=0, description="None = the task's default.")
    max_length: int = Field(128, ge=8, description="Max tokens per example.")
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="Fraction of steps with linear warmup.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="Autocast dtype; auto = bf16 where the device computes it natively, else fp32.")
    compile: bool | Literal["auto"] = Field(
        "auto", description="torch.compile the encoder's dense blocks (true/false); auto = on CUDA only (README).")
    max_train_examples: int | None = Field(None, ge=1, description="Truncate training sets (debug runs).")
    max_eval_examples: int | None = Field(None, ge=1, description="Truncate dev sets (debug runs).")
    register_models: bool = Field(True, description="Register the best model per task in the MLflow Model Registry.")
    zero_stage: Literal[0, 1, 2] | None = Field(
        None, description="Train through DeepSpeed with this ZeRO stage (one process); None = plain torch loop."
    )
    allow_pickle: bool = Field(False, description="Load pytorch_model.bin checkpoints (pickle: only trusted files).")


# ----------------------------------------------------------------------------------------------------------------
# Model Registry
# ----------------------------------------------------------------------------------------------------------------
class RegistryConfig(Section):
    register_encoder: bool = Field(True, description="Register the pretrained encoder as <name>-encoder.")
    margin: float = Field(0.0, ge=0, description="A challenger becomes champion only if it beats the champion by more.")
    higher_is_better: bool = Field(True, description="Direction of the fine-tuned models' task score.")
    encoder_metric: Literal["eval/mlm_loss", "eval/mlm_acc", "eval/loss"] = Field(
        "eval/mlm_loss", description="Held-out pretraining metric the encoder's gate compares; a loss: lower wins.")
    encoder_margin: float = Field(0.0, ge=0, description="The encoder's promotion margin, in encoder_metric's units.")


# ----------------------------------------------------------------------------------------------------------------
# The whole run
# ----------------------------------------------------------------------------------------------------------------
class PipelineConfig(Section):
    name: str = Field("bertscale", description="Run name; prefixes registered model names.")
    workdir: str = Field("runs/default", description="Where every stage writes its output.")
    seed: int = Field(42, description="Global seed.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    corpus: CorpusConfig = Field(default_factory=CorpusConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)

    @model_validator(mode="after")
    def _known_bad_combinations(self) -> "PipelineConfig":
        t = self.train
        if t.optimizer == "lamb" and t.zero_stage >= 1:
            raise ValueError(
                "train.optimizer=lamb needs train.zero_stage=0: LAMB's per-tensor trust ratios break on ZeRO's "
                "flattened partitions"
            )
        if t.phase_steps is not None:
            if len(t.phase_steps) != len(self.data.seq_lengths):
                raise ValueError(
                    f"train.phase_steps has {len(t.phase_steps)} entries but data.seq_lengths has "
                    f"{len(self.data.seq_lengths)}: give one step count per sequence-length phase"
                )
            if sum(t.phase_steps) != t.max_steps:
                raise ValueError(f"train.phase_steps sum to {sum(t.phase_steps)}, not train.max_steps={t.max_steps}")
        if max(self.data.seq_lengths) > self.model.max_position_embeddings:
            raise ValueError(
                f"data.seq_lengths {self.data.seq_lengths} exceed model.max_position_embeddings="
                f"{self.model.max_position_embeddings}"
            )
        return self

    def stage_location(self, stage: str) -> str:
        """Output of a stage as a string: its `output` field, or <workdir>/<stage>. URIs (gs://...) are kept as
        written, since pathlib would collapse `gs://b` to `gs:/b`; only the corpus stage writes to them."""
        section = getattr(self, stage, None)
        explicit = getattr(section, "output", None) if section is not None else None
        if explicit:
            return explicit if is_uri(explicit) else str(Path(explicit))
        if is_uri(self.workdir):
            return f"{self.workdir.rstrip('/')}/{stage}"
        return str(Path(self.workdir) / stage)

    def stage_dir(self, stage: str) -> Path:
        """Local output directory of a stage; ConfigError for a URI, which a Path would silently mangle."""
        location = self.stage_location(stage)
        if is_uri(location):
            raise ConfigError(
                f"the {stage} stage's location {location} is a URI, but this step needs a local directory: set "
                f"{stage}.output (and workdir) to a local path, or copy the data there first"
            )
        return Path(location)

    def tracking_uri(self) -> str:
        if self.tracking.tracking_uri:
            return self.tracking.tracking_uri
        return f"sqlite:///{(Path(self.workdir) / 'mlflow.db').resolve()}"


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------
def _format_validation_error(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if p != "__root__")
        msg = e["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "invalid config: " + "; ".join(parts)


def parse_override(item: str) -> tuple[list[str], Any]:
    """Parse `a.b.c=value`; the value is read as YAML so numbers, bools and lists keep their type."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key.path=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def _deep_merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}".splitlines()[0]) from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level, not {type(data).__name__}")
    # `base: other.yaml` chains override files, resolved relative to this one.
    base = data.pop("base", None)
    if base:
        data = _deep_merge(read_yaml(path.parent / base), data)
    return data


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, extra: dict | None = None
) -> PipelineConfig:
    """Defaults, then the YAML file, then `extra` (CLI flags as a nested dict), then `key=value` overrides."""
    data: dict = read_yaml(path) if path else {}
    if extra:
        data = _deep_merge(data, extra)
    for item in overrides or []:
        keys, value = parse_override(item)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {k} is not a section")
        node[keys[-1]] = value
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e)) from None


def dump_config(cfg: PipelineConfig) -> dict:
    """A plain, JSON/YAML-serialisable dict of the config."""
    return cfg.model_dump(mode="json")


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}`; used for MLflow params."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
