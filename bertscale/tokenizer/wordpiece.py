"""WordPiece tokenizer stage: train on the corpus shards, save in the Hugging Face layout, load, fingerprint.

Training streams the text column of the corpus stage's parquet shards (or any parquet/.txt files) batch by batch
into HF `tokenizers`' WordPiece trainer, so the corpus is never held in memory. A seeded random sample of the
documents is held out of training and used to report the [UNK] rate and tokens per word. The output directory holds
`tokenizer.json`, `vocab.txt`, `tokenizer_config.json` and `special_tokens_map.json` (loadable by
`transformers.AutoTokenizer`) plus `bertscale_tokenizer.json` with the fingerprint and the stats.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import json
import logging
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors, trainers
from tokenizers.models import WordPiece

from bertscale.config import PipelineConfig, TokenizerConfig
from bertscale.errors import ConfigError, InputError
from bertscale.progress import ProgressBar, is_terminal, progress_bar, progress_enabled
from bertscale.tracking import StageRecord

log = logging.getLogger(__name__)

# Order matters: the trainer assigns ids in this order, so [PAD] is 0 as the model and collator expect.
SPECIAL_TOKENS: dict[str, str] = {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"}
STATS_FILE = "bertscale_tokenizer.json"
MODEL_MAX_LENGTH = 512
_CORPUS_SUFFIXES = (".parquet", ".txt")


# ----------------------------------------------------------------------------------------------------------------
# Result
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class TokenizerResult:
    """What the stage produced: where, which vocabulary (fingerprint) and how well it covers held-out text."""

    output_dir: Path
    fingerprint: str
    vocab_size: int
    stats: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        s = self.stats
        lines = [f"tokenizer: {self.vocab_size} tokens, fingerprint {self.fingerprint[:16]} -> {self.output_dir}"]
        if s.get("heldout_docs"):
            lines.append(
                f"  held-out: {int(s['heldout_docs'])} docs, [UNK] rate {s['unk_rate']:.4%}, "
                f"{s['tokens_per_word']:.3f} tokens/word"
            )
        if "train_docs" in s:
            lines.append(
                f"  trained on {int(s['train_docs'])} docs from {int(s['input_files'])} files in "
                f"{s['train_seconds']:.1f} s ({int(s['empty_files'])} empty files and {int(s['empty_docs'])} "
                "empty docs skipped)"
            )
        return "\n".join(lines)

    def record(self) -> StageRecord:
        """For tracking: the tokenizer section, vocabulary/quality stats, the tokenizer files, the fingerprint."""
        return StageRecord("tokenizer", metrics={**{f"tokenizer.{k}": v for k, v in self.stats.items()},
                                                 "tokenizer.vocab_size": self.vocab_size},
                           artifacts=[(self.output_dir, "tokenizer")],
                           tags={"bertscale.tokenizer_fingerprint": self.fingerprint})


# ----------------------------------------------------------------------------------------------------------------
# Reading the corpus
# ----------------------------------------------------------------------------------------------------------------
def resolve_corpus_files(spec: str | Path) -> list[Path]:
    """Files of a corpus: a corpus stage dir (manifest order), any dir (sorted), a glob or a single file."""
    text = str(spec)
    if any(ch in text for ch in "*?["):
        files = [Path(p) for p in sorted(glob.glob(text, recursive=True)) if p.endswith(_CORPUS_SUFFIXES)]
        if not files:
            raise InputError(f"corpus glob {text!r} matches no .parquet or .txt files")
        return files
    path = Path(spec)
    if path.is_file():
        if not path.name.endswith(_CORPUS_SUFFIXES):
            raise InputError(f"corpus file {path} is neither .parquet nor .txt; pass parquet shards or text files")
        return [path]
    if not path.is_dir():
        raise InputError(f"corpus {path} does not exist: run `bertscale corpus` first or pass --corpus")
    manifest = path / "manifest.json"
    if manifest.is_file():
        return _manifest_files(manifest)
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(_CORPUS_SUFFIXES))
    if not files:
        raise InputError(f"corpus dir {path} holds no .parquet or .txt files")
    return files


def _manifest_files(manifest: Path) -> list[Path]:
    try:
        shards = json.loads(manifest.read_text())["shards"]
        files = [manifest.parent / s["name"] for s in shards]
    except (ValueError, KeyError, TypeError) as e:
        raise InputError(f"corpus manifest {manifest} is not valid ({e}); re-run `bertscale corpus`") from None
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise InputError(f"corpus manifest {manifest} lists missing shards {missing[:3]}; re-run `bertscale corpus`")
    return files


def txt_encoding(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """UTF-8 if the whole file decodes as UTF-8, else cp1252 (old Gutenberg/Windows texts), else latin-1."""
    for encoding in ("utf-8", "cp1252"):
        decoder = codecs.getincrementaldecoder(encoding)()
        try:
            with path.open("rb") as fh:
                while chunk := fh.read(chunk_bytes):
                    decoder.decode(chunk)
                decoder.decode(b"", final=True)
            return encoding
        except UnicodeDecodeError:
            continue
    return "latin-1"  # decodes any byte sequence


def _txt_documents(path: Path, encoding: str = "utf-8") -> Iterator[str]:
    """Documents of a text file: blocks separated by blank lines, read line by line."""
    block: list[str] = []
    with path.open(encoding=encoding) as fh:
        for line in fh:
            if line.strip():
                block.append(line.rstrip("\n"))
            elif block:
                yield "\n".join(block)
                block = []
    if block:
        yield "\n".join(block)


def _parquet_file(path: Path, column: str) -> pq.ParquetFile:
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise InputError(f"cannot read parquet file {path}: {e}") from None
    if column not in pf.schema_arrow.names:
        raise InputError(
            f"parquet file {path} has no column {column!r} (columns: {pf.schema_arrow.names}); "
            "set tokenizer.text_column"
        )
    return pf


def text_bytes(path: Path, column: str = "text") -> int:
    """About how many bytes of text a file holds: the text column's uncompressed size from the parquet footer
    (values plus their 4-byte lengths), or a text file's size."""
    if path.name.endswith(".parquet"):
        meta = _parquet_file(path, column).metadata
        index = meta.schema.names.index(column)
        return sum(meta.row_group(g).column(index).total_uncompressed_size for g in range(meta.num_row_groups))
    return path.stat().st_size


def sampled(positions: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Which row positions belong to the training sample: a hash of (seed, position) against `fraction`, so the
    choice of a row never depends on how the rows were batched."""
    if fraction >= 1:
        return np.ones(len(positions), dtype=bool)
    with np.errstate(over="ignore"):
        x = positions.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(seed & (2**64 - 1))
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x < np.uint64(int(fraction * 2**64))


def count_documents(path: Path, column: str = "text", encoding: str = "utf-8") -> int:
    """Rows of a parquet file (from its footer) or blank-line separated blocks of a text file."""
    if path.name.endswith(".parquet"):
        return _parquet_file(path, column).metadata.num_rows
    return sum(1 for _ in _txt_documents(path, encoding))


def iter_document_batches(path: Path, batch_size: int, column: str = "text",
                          encoding: str = "utf-8") -> Iterator[list[str | None]]:
    """Batches of documents of one file; parquet is read with `iter_batches`, never whole."""
    if path.name.endswith(".parquet"):
        for batch in _parquet_file(path, column).iter_batches(batch_size=batch_size, columns=[column]):
            yield batch.column(0).to_pylist()
        return
    batch: list[str | None] = []
    for doc in _txt_documents(path, encoding):
        batch.append(doc)
        if len(batch) >= batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


class CorpusStream:
    """Iterates training batches of a corpus and keeps a seeded random sample of `heldout` documents aside.

    The sample is drawn over row positions, whose count is known up front from the parquet footers, so it is the
    same on every run with the same seed and no document is buffered beyond the held-out sample itself. A random
    sample, not the last rows: corpus shards are in source order, so the tail is one source's documents. Empty
    files and empty or null documents are skipped and counted. With `sample_bytes` smaller than the corpus, only
    a seeded random sample of about that many bytes is trained on (`sampled`); the rest is counted as
    `unsampled_docs`.
    """

    def __init__(self, files: list[Path], batch_size: int, heldout: int, column: str = "text",
                 seed: int = 0, sample_bytes: int | None = None) -> None:
        self.files, self.batch_size, self.column = files, batch_size, column
        self.encodings = [txt_encoding(f) if f.name.endswith(".txt") else "utf-8" for f in files]
        for f, enc in zip(files, self.encodings):
            if enc != "utf-8":
                log.warning("%s is not UTF-8; reading it as %s", f, enc)
        self.doc_counts = [count_documents(f, column, enc) for f, enc in zip(files, self.encodings)]
        self.total_docs = sum(self.doc_counts)
        # At most a tenth of the corpus is held out, so a small corpus still has most of its text to train on.
        self.heldout_target = min(heldout, self.total_docs // 10)
        self.heldout_positions = np.sort(np.random.default_rng([seed, 0x70CE]).choice(
            self.total_docs, size=self.heldout_target, replace=False))
        self.heldout: list[str] = []
        self.seed = seed
        total_bytes = sum(text_bytes(f, column) for f in files)
        self.fraction = 1.0 if sample_bytes is None or total_bytes <= sample_bytes else sample_bytes / total_bytes
        self.counts = {"input_files": len(files), "non_utf8_files": sum(e != "utf-8" for e in self.encodings),
                       "empty_files": 0, "empty_docs": 0, "train_docs": 0, "unsampled_docs": 0,
                       "train_chars": 0}

    @property
    def expected_train_docs(self) -> int:
        return round((self.total_docs - self.heldout_target) * self.fraction)

    def __iter__(self) -> Iterator[list[str]]:
        start = time.monotonic()
        # On a terminal the trainer draws its own bars, for reading and for every phase after it; elsewhere
        # they are hidden and this bar reports the reading.
        with progress_bar(self.total_docs, "tokenizer: reading", "doc", enabled=not is_terminal(sys.stderr)) as bar:
            yield from self._batches(bar)
        log.info("tokenizer: all %s documents read in %.0f s (%s trained on); computing the vocabulary",
                 f"{self.total_docs:,}", time.monotonic() - start, f"{self.counts['train_docs']:,}")

    def _batches(self, bar: ProgressBar) -> Iterator[list[str]]:
        position = 0
        for path, n_docs, encoding in zip(self.files, self.doc_counts, self.encodings):
            if n_docs == 0:
                self.counts["empty_files"] += 1
                log.warning("skipping empty corpus file %s", path)
                continue
            for batch in iter_document_batches(path, self.batch_size, self.column, encoding):
                # Positions count rows, so empty rows count too.
                train, held = self._split(batch, position)
                self.counts["empty_docs"] += len(batch) - len(train) - len(held)
                if self.fraction < 1:
                    # Rows outside the sample read as empty; held-out rows stay held out either way.
                    in_sample = sampled(np.arange(position, position + len(batch)), self.fraction, self.seed)
                    sample, _ = self._split([d if keep else None for d, keep in zip(batch, in_sample)], position)
                    self.counts["unsampled_docs"] += len(train) - len(sample)
                    train = sample
                position += len(batch)
                self.heldout.extend(held)
                if train:
                    self.counts["train_docs"] += len(train)
                    self.counts["train_chars"] += sum(map(len, train))
                bar.set_postfix(trained=f"{self.counts['train_docs']:,}",
                                text=f"{self.counts['train_chars'] / 1e6:.1f}MB", refresh=False)
                bar.update(len(batch))
                if train:
                    yield train

    def read_heldout(self) -> list[str]:
        """Only the held-out sample, reading just the files it lies in (for a tokenizer that is not trained)."""
        position = 0
        for path, n_docs, encoding in zip(self.files, self.doc_counts, self.encodings):
            if self._held_in(position, position + n_docs).size:
                for batch in iter_document_batches(path, self.batch_size, self.column, encoding):
                    self.heldout.extend(self._split(batch, position)[1])
                    position += len(batch)
            else:
                position += n_docs
        return self.heldout

    def _held_in(self, start: int, end: int) -> np.ndarray:
        """Held-out positions in [start, end)."""
        lo, hi = np.searchsorted(self.heldout_positions, [start, end])
        return self.heldout_positions[lo:hi]

    def _split(self, batch: list[str | None], start: int) -> tuple[list[str], list[str]]:
        """Training and held-out documents of a batch whose first row is at `start`; empty ones are dropped."""
        held_rows = set((self._held_in(start, start + len(batch)) - start).tolist())
        keep = [d for i, d in enumerate(batch) if i not in held_rows and d and not d.isspace()]
        held = [d for i, d in enumerate(batch) if i in held_rows and d and not d.isspace()]
        return keep, held


# ----------------------------------------------------------------------------------------------------------------
# Building and training
# ----------------------------------------------------------------------------------------------------------------
def bert_post_processor(cls_id: int, sep_id: int) -> processors.TemplateProcessing:
    """`[CLS] A [SEP]` and `[CLS] A [SEP] B [SEP]`, with token type 1 on B and its [SEP]."""
    return processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0",
        pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )


def build_wordpiece(
    vocab: dict[str, int] | None = None,
    lowercase: bool = True,
    strip_accents: bool | None = None,
    handle_chinese_chars: bool = True,
) -> Tokenizer:
    """A BERT WordPiece tokenizer (normalizer, pre-tokenizer, decoder); post-processor once the vocab is known."""
    model = WordPiece(vocab, unk_token=SPECIAL_TOKENS["unk"]) if vocab else WordPiece(unk_token=SPECIAL_TOKENS["unk"])
    tok = Tokenizer(model)
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=handle_chinese_chars, strip_accents=strip_accents, lowercase=lowercase
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    if vocab:
        _finish(tok)
    return tok


def _finish(tok: Tokenizer) -> None:
    """Mark the special tokens present as special (never split, skipped on decode) and add the post-processor."""
    present = [t for t in SPECIAL_TOKENS.values() if tok.token_to_id(t) is not None]
    tok.add_special_tokens(present)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    if cls_id is None or sep_id is None:
        raise InputError("the vocabulary has no [CLS] or [SEP] token; a BERT tokenizer needs both")
    tok.post_processor = bert_post_processor(cls_id, sep_id)


def make_trainer(tcfg: TokenizerConfig, show_progress: bool = False) -> trainers.WordPieceTrainer:
    return trainers.WordPieceTrainer(
        vocab_size=tcfg.vocab_size,
        min_frequency=tcfg.min_frequency,
        limit_alphabet=tcfg.limit_alphabet,
        special_tokens=list(SPECIAL_TOKENS.values()),
        continuing_subword_prefix="##",
        show_progress=show_progress,
    )


def train_wordpiece(tcfg: TokenizerConfig, batches: Iterator[list[str]], length: int | None = None) -> Tokenizer:
    """Train a BERT WordPiece tokenizer from an iterator of document batches."""
    tok = build_wordpiece(
        lowercase=tcfg.lowercase, strip_accents=tcfg.strip_accents, handle_chinese_chars=tcfg.handle_chinese_chars
    )
    # The trainer's own bars redraw without a rate limit: for a person at a terminal only (`CorpusStream` reports
    # the reading elsewhere).
    show = progress_enabled() and is_terminal(sys.stderr)
    tok.train_from_iterator(batches, trainer=make_trainer(tcfg, show), length=length)
    return canonical_order(tok)


def canonical_order(tok: Tokenizer) -> Tokenizer:
    """The same WordPiece vocabulary with ids in a fixed order: special tokens, then the rest sorted.

    The trainer numbers `##` pieces in hash-map order, which changes from run to run (huggingface/tokenizers
    issue 1794), so the same token set would get different ids. WordPiece encoding is a longest-match lookup that
    does not depend on ids, so renumbering changes no tokenization, only makes ids reproducible.
    """
    vocab = tok.get_vocab(with_added_tokens=True)
    specials = [t for t in SPECIAL_TOKENS.values() if t in vocab]
    rest = sorted(t for t in vocab if t not in SPECIAL_TOKENS.values())
    settings = _normalizer_settings(tok) or {}
    return build_wordpiece(
        {t: i for i, t in enumerate(specials + rest)},
        lowercase=settings.get("do_lower_case", True),
        strip_accents=settings.get("strip_accents"),
        handle_chinese_chars=settings.get("tokenize_chinese_chars", True),
    )


def train_tokenizer(cfg: PipelineConfig, corpus: str | Path | None = None) -> TokenizerResult:
    """Train (or import, with `tokenizer.pretrained`) the tokenizer and write it to `cfg.stage_dir("tokenizer")`."""
    tcfg = cfg.tokenizer
    out_dir = cfg.stage_dir("tokenizer")
    if tcfg.pretrained:
        return _import_pretrained(cfg, corpus)
    spec = corpus if corpus is not None else cfg.stage_dir("corpus")
    stream = CorpusStream(resolve_corpus_files(spec), tcfg.batch_size, tcfg.heldout_docs, tcfg.text_column,
                          tcfg.heldout_seed, tcfg.sample_bytes)
    if stream.total_docs == 0:
        raise InputError(f"corpus {spec} holds no documents; check the corpus stage output (or --corpus)")
    if stream.fraction < 1:
        log.info("tokenizer: training on a %.1f%% sample of the corpus (tokenizer.sample_bytes=%d)",
                 100 * stream.fraction, tcfg.sample_bytes)
    start = time.perf_counter()
    tok = train_wordpiece(tcfg, iter(stream), length=stream.expected_train_docs)
    seconds = time.perf_counter() - start
    if stream.counts["train_docs"] == 0:
        raise InputError(f"corpus {spec} has no text to train on: all {stream.total_docs} documents are empty")
    stats = {**heldout_stats(tok, stream.heldout), **stream.counts, "sample_fraction": round(stream.fraction, 6),
             "train_seconds": seconds}
    settings = {"lowercase": tcfg.lowercase, "strip_accents": tcfg.strip_accents,
                "handle_chinese_chars": tcfg.handle_chinese_chars}
    result = save_tokenizer(tok, out_dir, stats, {"corpus": str(spec), "settings": settings})
    log.info("%s", result.summary())
    return result


def _import_pretrained(cfg: PipelineConfig, corpus: str | Path | None) -> TokenizerResult:
    """Load an existing HF tokenizer, re-save it in our layout and measure it on the corpus if there is one."""
    source = Path(cfg.tokenizer.pretrained or "")
    tok = load_tokenizer(source)
    special_ids(tok)
    if tok.post_processor is None:
        _finish(tok)
    stats: dict[str, float] = {}
    spec = corpus if corpus is not None else cfg.stage_dir("corpus")
    if corpus is not None or Path(spec).exists():
        stream = CorpusStream(resolve_corpus_files(spec), cfg.tokenizer.batch_size, cfg.tokenizer.heldout_docs,
                              cfg.tokenizer.text_column, cfg.tokenizer.heldout_seed)
        stats = heldout_stats(tok, stream.read_heldout())
    return save_tokenizer(tok, cfg.stage_dir("tokenizer"), stats, {"pretrained": str(source), "corpus": str(spec)})


# ----------------------------------------------------------------------------------------------------------------
# Quality stats
# ----------------------------------------------------------------------------------------------------------------
def heldout_stats(tok: Tokenizer, docs: list[str], batch_size: int = 256) -> dict[str, float]:
    """[UNK] rate (share of tokens) and tokens per whitespace word on held-out documents."""
    unk_id = tok.token_to_id(SPECIAL_TOKENS["unk"])
    tokens = unks = words = 0
    for i in range(0, len(docs), batch_size):
        chunk = docs[i : i + batch_size]
        for enc in tok.encode_batch(chunk, add_special_tokens=False):
            tokens += len(enc.ids)
            unks += enc.ids.count(unk_id)
        words += sum(len(d.split()) for d in chunk)
    return {
        "heldout_docs": len(docs),
        "heldout_tokens": tokens,
        "unk_rate": unks / tokens if tokens else 0.0,
        "tokens_per_word": tokens / words if words else 0.0,
    }


# ----------------------------------------------------------------------------------------------------------------
# Saving (Hugging Face layout)
# ----------------------------------------------------------------------------------------------------------------
def vocab_tokens(tok: Tokenizer) -> list[str]:
    """The vocabulary in id order; ids must be 0..n-1 without gaps (vocab.txt cannot express gaps)."""
    vocab = tok.get_vocab(with_added_tokens=True)
    tokens = [""] * len(vocab)
    for token, idx in vocab.items():
        if idx >= len(tokens) or tokens[idx]:
            raise InputError(f"the tokenizer's ids are not contiguous (id {idx} of {token!r}); cannot write vocab.txt")
        tokens[idx] = token
    return tokens


def tokenizer_fingerprint(tok: Tokenizer) -> str:
    """sha256 of what decides the ids of a text: the vocabulary in id order and the normalizer and WordPiece
    settings. The same vocabulary cased instead of uncased gives other ids for the same text, and the fingerprint
    keys the tokenized-data cache, so both must be in it."""
    spec = json.loads(tok.to_str())
    identity = {"vocab": vocab_tokens(tok), "normalizer": _normalizer_identity(spec.get("normalizer")),
                "model": _model_identity(spec.get("model") or {})}
    return hashlib.sha256(json.dumps(identity, ensure_ascii=False, sort_keys=True).encode("utf-8")).hexdigest()


def _normalizer_identity(norm: dict[str, Any] | None) -> dict[str, Any] | None:
    """BERT normalizer flags with `strip_accents` resolved (None follows lowercase), so two spellings of the
    same behaviour agree; any other normalizer as its serialized form."""
    if not norm or norm.get("type") != "BertNormalizer":
        return norm
    lowercase = bool(norm.get("lowercase", True))
    strip = norm.get("strip_accents")
    return {"type": "BertNormalizer", "clean_text": bool(norm.get("clean_text", True)), "lowercase": lowercase,
            "strip_accents": lowercase if strip is None else bool(strip),
            "handle_chinese_chars": bool(norm.get("handle_chinese_chars", True))}


def _model_identity(model: dict[str, Any]) -> dict[str, Any]:
    return {k: model.get(k) for k in ("type", "unk_token", "continuing_subword_prefix", "max_input_chars_per_word")}


def _normalizer_settings(tok: Tokenizer) -> dict[str, Any] | None:
    """do_lower_case & co. for tokenizer_config.json, or None when the normalizer is not BERT's."""
    norm = json.loads(tok.to_str()).get("normalizer") or {}
    if norm.get("type") != "BertNormalizer":
        return None
    return {"do_lower_case": norm.get("lowercase", True), "strip_accents": norm.get("strip_accents"),
            "tokenize_chinese_chars": norm.get("handle_chinese_chars", True)}


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def save_tokenizer(tok: Tokenizer, out_dir: str | Path, stats: dict[str, float] | None = None,
                   extra: dict[str, Any] | None = None) -> TokenizerResult:
    """Write the HF layout plus bertscale_tokenizer.json (written last: its presence means a complete dir)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / STATS_FILE).unlink(missing_ok=True)
    tokens = vocab_tokens(tok)
    tok.save(str(out / "tokenizer.json"))
    (out / "vocab.txt").write_text("".join(t + "\n" for t in tokens), encoding="utf-8")
    settings = _normalizer_settings(tok)
    # BertTokenizer rebuilds the normalizer from these flags, so they must match tokenizer.json; anything else
    # loads through the generic class, which takes tokenizer.json as it is.
    hf_config: dict[str, Any] = {"tokenizer_class": "BertTokenizer" if settings else "PreTrainedTokenizerFast",
                                 **(settings or {}), "model_max_length": MODEL_MAX_LENGTH,
                                 **{f"{k}_token": v for k, v in SPECIAL_TOKENS.items()}}
    _write_json(out / "tokenizer_config.json", hf_config)
    _write_json(out / "special_tokens_map.json", {f"{k}_token": v for k, v in SPECIAL_TOKENS.items()})
    fingerprint = tokenizer_fingerprint(tok)
    stats = dict(stats or {})
    _write_json(out / STATS_FILE, {"fingerprint": fingerprint, "vocab_size": len(tokens),
                                   "special_ids": special_ids(tok), "stats": stats, **(extra or {})})
    return TokenizerResult(output_dir=out, fingerprint=fingerprint, vocab_size=len(tokens), stats=stats)


# ----------------------------------------------------------------------------------------------------------------
# Loading and checking
# ----------------------------------------------------------------------------------------------------------------
def load_tokenizer(path: str | Path) -> Tokenizer:
    """A tokenizer from a dir with tokenizer.json, a dir with only vocab.txt, or a tokenizer.json file."""
    p = Path(path)
    if p.is_file():
        return _from_json(p)
    if (p / "tokenizer.json").is_file():
        return _from_json(p / "tokenizer.json")
    if (p / "vocab.txt").is_file():
        return _from_vocab_txt(p)
    raise InputError(
        f"no tokenizer at {p}: expected a tokenizer.json file or a dir with tokenizer.json or vocab.txt "
        "(train one with `bertscale tokenizer`)"
    )


def _from_json(path: Path) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        raise InputError(f"cannot load tokenizer file {path}: {e}") from None


def _from_vocab_txt(directory: Path) -> Tokenizer:
    """Rebuild a BERT tokenizer from vocab.txt, honouring do_lower_case & co. of tokenizer_config.json."""
    tokens = (directory / "vocab.txt").read_text(encoding="utf-8").splitlines()
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    if len(vocab) != len(tokens):
        raise InputError(f"{directory / 'vocab.txt'} repeats tokens; each line must be a distinct token")
    options: dict[str, Any] = {}
    config_file = directory / "tokenizer_config.json"
    if config_file.is_file():
        try:
            options = json.loads(config_file.read_text(encoding="utf-8"))
        except ValueError as e:
            raise InputError(f"{config_file} is not valid JSON ({e})") from None
    lowercase = bool(options.get("do_lower_case", True))
    return build_wordpiece(vocab, lowercase=lowercase, strip_accents=options.get("strip_accents"),
                           handle_chinese_chars=bool(options.get("tokenize_chinese_chars", True)))


def special_ids(tok: Tokenizer) -> dict[str, int]:
    """Ids of pad, unk, cls, sep and mask; InputError naming any token the vocabulary lacks."""
    ids = {key: tok.token_to_id(token) for key, token in SPECIAL_TOKENS.items()}
    missing = [SPECIAL_TOKENS[k] for k, v in ids.items() if v is None]
    if missing:
        raise InputError(f"the tokenizer's vocabulary lacks the special tokens {missing}; BERT needs all of "
                         f"{list(SPECIAL_TOKENS.values())}")
    return {k: int(v) for k, v in ids.items() if v is not None}


def check_compatible(tok: Tokenizer, vocab_size: int) -> None:
    """ConfigError unless the tokenizer fits a model with `vocab_size` embeddings and has every special token."""
    actual = tok.get_vocab_size(with_added_tokens=True)
    if actual != vocab_size:
        raise ConfigError(
            f"the tokenizer has {actual} tokens but the model's vocab_size is {vocab_size}: set model.vocab_size="
            f"{actual} (or leave it unset to follow the tokenizer), or use the tokenizer the model was trained with"
        )
    try:
        special_ids(tok)
    except InputError as e:
        raise ConfigError(str(e)) from None


# ----------------------------------------------------------------------------------------------------------------
# Batched encoding for `datasets.map`
# ----------------------------------------------------------------------------------------------------------------
class DatasetsEncoder:
    """`datasets.map(batched=True, num_proc=N)` function: token ids per text, without special tokens.

    The tokenizer is loaded once per process (lazily after unpickling in a worker) and never pickled; the pickled
    state carries the vocabulary fingerprint, so `datasets`' cache is invalidated when the tokenizer changes.
    Rows of the input column are strings (-> one id list per row) or lists of strings such as the corpus's
    `sentences` (-> one id list per sentence); all texts of a batch go through one `encode_batch` call.
    """

    def __init__(self, tok_path: str | Path, column: str = "sentences", output: str = "input_ids") -> None:
        self.tok_path, self.column, self.output = str(Path(tok_path).resolve()), column, output
        self._tok: Tokenizer | None = load_tokenizer(self.tok_path)
        self.fingerprint = tokenizer_fingerprint(self._tok)

    def __getstate__(self) -> dict[str, Any]:
        return {"tok_path": self.tok_path, "column": self.column, "output": self.output,
                "fingerprint": self.fingerprint}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._tok = None

    def _tokenizer(self) -> Tokenizer:
        if self._tok is None:
            self._tok = load_tokenizer(self.tok_path)
        # A pretrained tokenizer.json may carry truncation/padding settings that would silently cut or pad
        # sentences here; instance creation decides lengths itself.
        self._tok.no_truncation()
        self._tok.no_padding()
        return self._tok

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        if self.column not in batch:
            raise InputError(f"the dataset has no column {self.column!r} to tokenize (columns: {list(batch)})")
        rows = batch[self.column]
        tok = self._tokenizer()
        if all(isinstance(r, str) or r is None for r in rows):
            encodings = tok.encode_batch([r or "" for r in rows], add_special_tokens=False)
            return {self.output: [e.ids for e in encodings]}
        texts = [s for r in rows for s in (r or ())]
        ids = [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]
        out, start = [], 0
        for r in rows:
            n = len(r or ())
            out.append(ids[start : start + n])
            start += n
        return {self.output: out}


def encode_batch_for_datasets(tok_path: str | Path, column: str = "sentences",
                              output: str = "input_ids") -> Callable[[dict[str, list]], dict[str, list]]:
    """The function the data stage passes to `datasets.Dataset.map(batched=True, num_proc=N)`."""
    return DatasetsEncoder(tok_path, column, output)
