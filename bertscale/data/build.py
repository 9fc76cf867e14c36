"""The pretraining-data stage: corpus shards -> tokenized documents -> instances -> memory-mapped shards.

Memory is bounded by one corpus shard per process, never by the corpus:

1. The corpus's parquet shards (its manifest.json order) are checked up front; an unreadable one is an error
   naming it, never a skip.
2. NSP mode: the B pool (`nsp_pool.py`), a fixed-size seeded sample of documents from all shards, is built
   first; random B segments come from it, so a shard needs no other shard to pair its documents.
3. Every corpus shard becomes one output shard (`shards.py`), built in `data.num_proc` processes: tokenized
   with `tokenizers` (`documents.py`), unusable documents dropped and counted, documents split into train and
   held-out, instances created (`instances.py`) for every phase and written as memory-mapped arrays with
   64-bit offsets, atomically (a directory is complete iff it holds its shard.json). A shard's bytes depend
   only on its inputs, so the output is the same for any number of processes.
4. `manifest.json`, listing every shard with its counts and sha256s, is written last: its presence means the
   output is complete. A killed run leaves its finished shards in place, and a re-run reuses them after
   verifying their checksums.

`datasets` is not used by this stage: its `map` cache holds the whole tokenized corpus with 32-bit list offsets
(see `documents.py`); the resumable per-shard output takes the place of that cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from bertscale.config import PipelineConfig, dump_config
from bertscale.data.dataset import MANIFEST
from bertscale.data.nsp_pool import PoolSample, build_pool, per_shard_counts
from bertscale.data.shards import SPLITS, BuildSettings, ShardJob, build_shard, shard_name
from bertscale.data.storage import remove_stale, write_json
from bertscale.errors import InputError
from bertscale.progress import logs_above, progress_bar
from bertscale.tracking import StageRecord

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: sharded output, B pool


@dataclass
class DataResult:
    """What the stage wrote and what it counted (flat numeric stats, ready to log as metrics)."""

    output_dir: Path
    manifest: dict
    stats: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        s = self.stats
        lines = [
            f"pretraining data ({self.manifest['mode']}) -> {self.output_dir}",
            f"  documents: {s['documents']} used ({s['documents_train']} train, {s['documents_heldout']} held out), "
            f"skipped: {s['skipped_empty']} empty, {s['skipped_unk']} mostly [UNK]; "
            f"{s['empty_shards']} empty shards, {s['empty_sentences']} empty sentences",
            f"  output shards: {s['shards']} ({s['shards_reused']} verified and reused from an earlier run)",
        ]
        for L in self.manifest["seq_lengths"]:
            for split in SPLITS:
                p = f"seq{L}.{split}"
                nsp = f", NSP random {s[p + '.nsp_random_ratio']:.3f}" if self.manifest["mode"] == "nsp" else ""
                lines.append(
                    f"  seq {L} {split}: {s[p + '.instances']} instances, {s[p + '.tokens']} tokens, "
                    f"real-token fraction {s[p + '.real_token_fraction']:.3f}{nsp}"
                )
        lines.append(f"  took {s['seconds']:.1f} s")
        return "\n".join(lines)

    def record(self) -> StageRecord:
        """For tracking: the data section, the numeric instance stats and the manifest."""
        numeric = {k: v for k, v in self.stats.items() if isinstance(v, (int, float))}
        return StageRecord("data", metrics={f"data.{k}": v for k, v in numeric.items()},
                           documents={"manifest.json": self.manifest})


# ----------------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------------
def corpus_shards(corpus: Path) -> tuple[list[Path], int, str | None]:
    """Non-empty parquet shards of a corpus dir (manifest order), the number of empty ones, the manifest sha256."""
    manifest_path = corpus / "manifest.json"
    if manifest_path.is_file():
        raw = manifest_path.read_bytes()
        try:
            names = [s["name"] for s in json.loads(raw)["shards"]]
        except (ValueError, KeyError, TypeError) as e:
            raise InputError(f"{manifest_path} is not a corpus manifest ({e!r}); rebuild the corpus") from None
        shards, sha = [corpus / n for n in names], hashlib.sha256(raw).hexdigest()
    else:
        shards, sha = sorted(corpus.glob("shards/*.parquet")) or sorted(corpus.glob("*.parquet")), None
    if not shards:
        raise InputError(f"no corpus at {corpus}: expected manifest.json or parquet shards (run `bertscale corpus`)")
    missing = [str(p) for p in shards if not p.is_file()]
    if missing:
        raise InputError(f"corpus shards listed in {manifest_path} are missing: {missing[:3]}; rebuild the corpus")
    nonempty = [p for p in shards if _shard_rows(p) > 0]
    if not nonempty:
        raise InputError(f"every corpus shard in {corpus} is empty: nothing to build pretraining data from")
    return nonempty, len(shards) - len(nonempty), sha


def _shard_rows(path: Path) -> int:
    """Rows of a corpus shard, after checking it is readable parquet with a `sentences` column."""
    try:
        meta = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise InputError(f"cannot read corpus shard {path} ({e}); rebuild the corpus") from None
    if "sentences" not in meta.schema_arrow.names:
        raise InputError(f"{path} has no `sentences` column; is it a bertscale corpus shard?")
    return meta.metadata.num_rows


# ----------------------------------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------------------------------
def _load_tokenizer(tok_path: Path) -> tuple[dict[str, int], str, int]:
    from bertscale.tokenizer import load_tokenizer, special_ids, tokenizer_fingerprint

    tok = load_tokenizer(tok_path)
    if tok.truncation is not None:
        log.warning("tokenizer %s truncates its inputs (%s): truncation is switched off to build the data",
                    tok_path, tok.truncation)
    return special_ids(tok), tokenizer_fingerprint(tok), tok.get_vocab_size(with_added_tokens=True)


def _worker_init() -> None:
    # The processes are the parallelism: a tokenizer thread pool per process would only oversubscribe the cores.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


@contextmanager
def process_map(num_proc: int) -> Iterator[Callable[[Callable, Iterable], Iterable]]:
    """An ordered `map` over `num_proc` spawned processes (in this process when 1); stops them on errors."""
    if num_proc <= 1:
        yield map
        return
    ex = ProcessPoolExecutor(num_proc, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init)
    try:
        yield ex.map
    finally:
        ex.shutdown(wait=True, cancel_futures=True)


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _plan(cfg: PipelineConfig, shards: list[Path], tok_path: Path, out: Path, special: dict[str, int],
          tok_fp: str, vocab_size: int) -> tuple[BuildSettings, list[ShardJob], list[PoolSample], str | None]:
    """The jobs of every shard and of the B pool, each keyed by everything its output depends on."""
    d = cfg.data
    settings = BuildSettings(str(tok_path.resolve()), special, vocab_size, d.mode, tuple(d.seq_lengths),
                             d.short_seq_prob, d.dupe_factor, d.heldout_fraction, d.seed, d.max_unk_fraction)
    # Size and mtime catch a shard rewritten in place without a new manifest.
    ids = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in shards]
    common = [FORMAT_VERSION, tok_fp, {**settings.__dict__, "tok_path": None}]
    pool_key, pool_jobs = None, []
    if d.mode == "nsp":
        pool_key = _key(common, ids, d.nsp_pool_documents)
        window = 2 * max(d.seq_lengths)
        pool_jobs = [PoolSample(k, str(p), n, settings.tok_path, special["unk"], d.seed, d.heldout_fraction,
                                d.max_unk_fraction, window)
                     for k, (p, n) in enumerate(zip(shards, per_shard_counts(d.nsp_pool_documents, len(shards))))]
    pool_dir = str(out / "nsp_pool") if pool_key else None
    jobs = [ShardJob(k, str(p), str(out), _key(common, k, ids[k], pool_key), settings, pool_dir)
            for k, p in enumerate(shards)]
    return settings, jobs, pool_jobs, pool_key


def _build_shards(cfg: PipelineConfig, out: Path, jobs: list[ShardJob], pool_jobs: list[PoolSample],
                  pool_key: str | None) -> list[dict]:
    """The pool, then every shard; returns the shards' records in shard order."""
    num_proc = max(1, min(cfg.data.num_proc or os.cpu_count() or 1, len(jobs)))
    remove_stale(out / "shards", {shard_name(j.index) for j in jobs})
    # Format 1 kept one array file per split in <out>/seq<L>/ and a datasets cache in <out>/.cache.
    for old in [out / ".cache", *(p for p in out.glob("seq*") if p.name[3:].isdigit())]:
        shutil.rmtree(old, ignore_errors=True)
    records = []
    documents = 0
    with process_map(num_proc) as run, progress_bar(len(jobs), "data: shards", "shard") as bar, logs_above(bar):
        if pool_key is not None:
            pool = build_pool(out, pool_jobs, pool_key, run)
            log.info("B pool: %d train, %d held-out documents", pool["train"], pool["heldout"])
        for rec in run(build_shard, jobs):
            records.append(rec)
            documents += rec["counts"]["documents_input"]
            log.info("shard %d/%d %s: %s", len(records), len(jobs), "verified, reused" if rec["reused"] else "built",
                     rec["source"])
            bar.set_postfix(documents=f"{documents:,}", refresh=False)
            bar.update(1)
    return records


def _phase_totals(records: list[dict], seq_len: int, split: str) -> dict[str, Any]:
    """Counts of one phase and split over all shards, and the shard list the reader follows."""
    parts = [r["phases"][str(seq_len)][split] for r in records]
    n, tokens = sum(p["instances"] for p in parts), sum(p["tokens"] for p in parts)
    labelled, random_b = sum(p["nsp_labelled"] for p in parts), sum(p["nsp_random"] for p in parts)
    shard_list = []
    for k, (r, p) in enumerate(zip(records, parts)):
        prefix = f"seq{seq_len}/{split}/"
        sha = {rel[len(prefix):]: v for rel, v in r["files"].items() if rel.startswith(prefix)}
        shard_list.append({"dir": f"shards/{shard_name(k)}/{prefix[:-1]}", "instances": p["instances"],
                           "tokens": p["tokens"], "sha256": sha})
    return {"instances": n, "tokens": tokens, "real_token_fraction": tokens / (n * seq_len) if n else 0.0,
            "mean_length": tokens / n if n else 0.0, "nsp_random_ratio": random_b / labelled if labelled else 0.0,
            "documents": sum(p["documents"] for p in parts),
            "long_sentences_cut": sum(p["long_sentences_cut"] for p in parts), "shards": shard_list}


def _stats(cfg: PipelineConfig, records: list[dict], empty_shards: int) -> tuple[dict, dict[str, Any]]:
    """Phases for the manifest and the flat stats (document counts summed over shards)."""
    keys = ("documents_input", "skipped_empty", "skipped_unk", "empty_sentences", "one_sentence_docs",
            "unk_tokens", "corpus_tokens", "documents_train", "documents_heldout")
    stats: dict[str, Any] = {k: sum(r["counts"][k] for r in records) for k in keys}
    stats.update(documents=stats["documents_train"] + stats["documents_heldout"], empty_shards=empty_shards,
                 shards=len(records), shards_reused=sum(r["reused"] for r in records))
    phases = {str(L): {split: _phase_totals(records, L, split) for split in SPLITS} for L in cfg.data.seq_lengths}
    for L, by_split in phases.items():
        stats.update({f"seq{L}.{split}.{k}": v for split, c in by_split.items() for k, v in c.items()
                      if k != "shards"})
    return phases, stats


def build_pretraining_data(cfg: PipelineConfig, corpus: str | Path | None = None,
                           tokenizer: str | Path | None = None) -> DataResult:
    """Tokenize the corpus and write instances for every phase in `cfg.data.seq_lengths` (see module doc)."""
    t0 = time.perf_counter()
    corpus_dir = Path(corpus) if corpus else cfg.stage_dir("corpus")
    tok_path = Path(tokenizer) if tokenizer else cfg.stage_dir("tokenizer")
    out = cfg.stage_dir("data")
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # an interrupted rebuild must not look complete
    special, tok_fp, vocab_size = _load_tokenizer(tok_path)
    shards, empty_shards, corpus_sha = corpus_shards(corpus_dir)
    _, jobs, pool_jobs, pool_key = _plan(cfg, shards, tok_path, out, special, tok_fp, vocab_size)
    phases, stats = _stats(cfg, _build_shards(cfg, out, jobs, pool_jobs, pool_key), empty_shards)
    if stats["documents_train"] < (2 if cfg.data.mode == "nsp" else 1):
        raise InputError(f"only {stats['documents_train']} usable training documents in {corpus_dir}: add "
                         "documents or lower data.heldout_fraction")
    if cfg.data.heldout_fraction > 0 and stats["documents_heldout"] == 0:
        log.warning("no document was held out (data.heldout_fraction=%s): evaluation will be disabled",
                    cfg.data.heldout_fraction)
    stats["seconds"] = time.perf_counter() - t0
    manifest = {
        "format": FORMAT_VERSION, "mode": cfg.data.mode, "seq_lengths": list(cfg.data.seq_lengths),
        "tokenizer": {"path": str(tok_path), "fingerprint": tok_fp, "vocab_size": vocab_size,
                      "special_ids": special},
        "corpus": {"path": str(corpus_dir), "manifest_sha256": corpus_sha},
        "phases": phases, "counts": {k: v for k, v in stats.items() if not k.startswith("seq")},
        "config": dump_config(cfg)["data"],
    }
    try:
        write_json(out / MANIFEST, manifest)
    except OSError as e:
        raise InputError(f"cannot write {out / MANIFEST}: {e.strerror or e}; free disk space and re-run") from None
    return DataResult(output_dir=out, manifest=manifest, stats=stats)
