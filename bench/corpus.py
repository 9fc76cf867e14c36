"""Corpus stage throughput against a bare reference loop, side by side in one run, on the same files.

    .venv/bin/python bench/corpus.py [--path DIR_OR_GLOB ... | --corpus-gb 0.25 --workdir DIR] [--workers 1 2]
                                     [--json out.json]

The reference is the least any corpus stage must do: parse the documents (the stage's own readers), NFC-normalize,
collapse whitespace and hash each one for exact dedup, in one plain Python loop. The Beam stage does all of that
plus every default rule, markup cleanup, MinHash + LSH near dedup, sentence splitting and the parquet shards, on
the local multi-processing runner (worker start-up and shard writing included); "unit work, no Beam" is the
workers' per-document work alone in one process, so the gap to "beam 1 worker" is the runner's own cost. Figures
are input MB per second per core used (the reference uses one); the ratio to the reference is the stage's
efficiency, and the 2-worker over 1-worker figure its scaling. The load average is printed because these machines
are shared: a busy machine cannot show scaling. The run also checks that every worker count wrote identical
shards, and compares our MinHash with datasketch's when datasketch is installed.

MB are those of the decompressed input text. The default input is the shared Wikipedia extract (66 MB, where the
runner's start-up is a visible share); `--corpus-gb` builds (once, under `--workdir`) a bigger corpus of real
text as bench/scale.py does, compressed so that it is split into work units like any large input.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
import unicodedata
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bertscale.config import CorpusConfig, load_config  # noqa: E402
from bertscale.corpus import run_corpus  # noqa: E402
from bertscale.corpus.pipeline import dedup_buckets  # noqa: E402
from bertscale.corpus.cleaning import clean_text  # noqa: E402
from bertscale.corpus.dedup import MinHasher  # noqa: E402
from bertscale.corpus.filters import build_rules, first_failed_rule  # noqa: E402
from bertscale.corpus.readers import Record, expand_inputs, open_stream, plan_units, read_unit  # noqa: E402
from bertscale.corpus.units import UnitProcessor  # noqa: E402
from bench.common import cpu_facts  # noqa: E402

SHARED = Path(os.environ.get("BERTSCALE_SHARED_DATA", REPO.parent / "shared" / "data"))


def reference_loop(paths: list[str]) -> tuple[float, int, int]:
    """Parse + NFC + whitespace collapse + exact hash, one process: (seconds, input bytes, unique documents)."""
    cfg = CorpusConfig(inputs=paths)
    start = time.perf_counter()
    files = expand_inputs(paths)
    seen: set[bytes] = set()
    stats: Counter[str] = Counter()
    for unit in plan_units(files, cfg):
        for item in read_unit(unit, cfg, stats):
            if isinstance(item, Record):
                text = " ".join(unicodedata.normalize("NFC", item.text).split())
                seen.add(hashlib.sha1(text.encode("utf-8")).digest())
    return time.perf_counter() - start, sum(f.size for f in files), len(seen)


def text_bytes(paths: list[str]) -> int:
    """Decompressed bytes of the input files (what the MB/s figures divide)."""
    total = 0
    for f in expand_inputs(paths):
        with open_stream(f.path) as fh:
            while chunk := fh.read(1 << 22):
                total += len(chunk)
    return total


def unit_work(paths: list[str], tmp: str) -> float:
    """The stage's per-unit work (everything the Beam workers do per document) in one process without Beam:
    the difference to the 1-worker Beam figure is the runner's own cost (start-up, shuffles, stages)."""
    cfg = CorpusConfig(inputs=paths)
    work_dir = f"{tmp}/units-only"
    os.makedirs(f"{work_dir}/units", exist_ok=True)
    start = time.perf_counter()
    files = expand_inputs(paths)
    processor = UnitProcessor(cfg, work_dir, dedup_buckets(sum(f.size for f in files)))
    for i, unit in enumerate(plan_units(files, cfg)):
        processor(i, unit)
    return time.perf_counter() - start


def minhash_vs_datasketch(paths: list[str], limit: int = 2000) -> dict | None:
    """Signature throughput (MB/s of kept text) of our batched MinHash and of datasketch's, when installed."""
    try:
        import datasketch
    except ImportError:
        return None
    cfg = CorpusConfig(inputs=paths)
    rules, docs = build_rules(cfg.filters), []
    for unit in plan_units(expand_inputs(paths), cfg):
        for item in read_unit(unit, cfg, Counter()):
            if isinstance(item, Record) and first_failed_rule(text := clean_text(item.text), rules) is None:
                docs.append(text)
        if len(docs) >= limit:
            break
    mb = sum(len(d.encode("utf-8")) for d in docs) / 1e6
    start = time.perf_counter()
    for doc in docs:
        words = doc.lower().split()
        sketch = datasketch.MinHash(num_perm=cfg.dedup.num_perm, seed=cfg.dedup.seed)
        sketch.update_batch([" ".join(words[i:i + 5]).encode() for i in range(max(1, len(words) - 4))])
    theirs = time.perf_counter() - start
    hasher, start = MinHasher(cfg.dedup.num_perm, cfg.dedup.shingle_size, cfg.dedup.seed), time.perf_counter()
    for i in range(0, len(docs), UnitProcessor.BATCH):
        hasher.signatures(docs[i:i + UnitProcessor.BATCH])
    ours = time.perf_counter() - start
    return {"datasketch_mb_per_s": round(mb / theirs, 2), "ours_mb_per_s": round(mb / ours, 2),
            "ours_vs_datasketch": round(theirs / ours, 2)}


def beam_stage(paths: list[str], workers: int, tmp: str) -> tuple[float, dict]:
    cfg = load_config(None, [f"workdir={tmp}/beam-{workers}", f"corpus.runner.num_workers={workers}"],
                      extra={"corpus": {"inputs": paths}})
    start = time.perf_counter()
    result = run_corpus(cfg)
    return time.perf_counter() - start, result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", nargs="+", default=[str(SHARED / "corpus" / "wikipedia")])
    parser.add_argument("--corpus-gb", type=float, help="Build and use a corpus of this many GB of text instead.")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "bertscale-bench-corpus",
                        help="Where --corpus-gb corpora are built and kept between runs.")
    parser.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--json", help="Also write the results here.")
    args = parser.parse_args()

    cpu = cpu_facts()
    print(f"cpu: {cpu['model']} ({cpu['cores']} cores), bf16 flags: {' '.join(cpu['bf16_flags']) or 'none'}; "
          f"load average before: {os.getloadavg()[0]:.1f}")
    if args.corpus_gb:
        from bench.scale import build_corpus

        target = args.workdir / f"corpus-{args.corpus_gb:g}gb"
        build_corpus(target, args.corpus_gb, SHARED / "corpus")
        args.path = [str(target)]
    seconds, size, unique = reference_loop(args.path)
    mb = text_bytes(args.path) / 1e6
    rows = [{"variant": "reference loop", "cores": 1, "seconds": round(seconds, 2),
             "mb_per_s_per_core": round(mb / seconds, 2), "docs": unique, "shards_sha256": None}]
    with tempfile.TemporaryDirectory() as tmp:
        seconds = unit_work(args.path, tmp)
        rows.append({"variant": "unit work, no Beam", "cores": 1, "seconds": round(seconds, 2),
                     "mb_per_s_per_core": round(mb / seconds, 2), "docs": None, "shards_sha256": None})
        for workers in args.workers:
            seconds, result = beam_stage(args.path, workers, tmp)
            rows.append({"variant": f"beam {workers} worker(s)", "cores": workers, "seconds": round(seconds, 2),
                         "mb_per_s_per_core": round(mb / seconds / workers, 2), "docs": result.counts["kept"],
                         "shards_sha256": [s["sha256"] for s in result.manifest["shards"]]})
    ref = rows[0]["mb_per_s_per_core"]
    for r in rows:
        r["vs_reference_per_core"] = round(r["mb_per_s_per_core"] / ref, 3)
    beams = [r for r in rows if r["variant"].startswith("beam")]
    scaling = {f"{b['cores']}w_vs_{beams[0]['cores']}w": round(beams[0]["seconds"] / b["seconds"], 2)
               for b in beams[1:]}
    identical = len({json.dumps(b["shards_sha256"]) for b in beams}) <= 1

    print(f"input: {', '.join(args.path)} ({mb:.1f} MB of text, {size / 1e6:.1f} MB of files)")
    print(f"{'variant':<20}{'seconds':>9}{'MB/s/core':>11}{'vs ref':>8}{'docs':>9}")
    for r in rows:
        print(f"{r['variant']:<20}{r['seconds']:>9.2f}{r['mb_per_s_per_core']:>11.2f}"
              f"{r['vs_reference_per_core']:>8.2f}{r['docs'] if r['docs'] is not None else '':>9}")
    print("speed-up: " + (", ".join(f"{k} {v:.2f}x" for k, v in scaling.items()) or "n/a"))
    print(f"identical shards across worker counts: {identical}; load average after: {os.getloadavg()[0]:.1f}")
    minhash = minhash_vs_datasketch(args.path)
    print("minhash: " + (f"ours {minhash['ours_mb_per_s']} MB/s, datasketch {minhash['datasketch_mb_per_s']} MB/s "
                         f"({minhash['ours_vs_datasketch']}x)" if minhash else "datasketch not installed, skipped"))
    if args.json:
        source = {"paths": args.path, "text_mb": round(mb, 1), "file_mb": round(size / 1e6, 1)}
        Path(args.json).write_text(json.dumps({"cpu": cpu, "input": source, "rows": rows, "scaling": scaling,
                                               "minhash": minhash, "identical": identical}, indent=2))
    return 0 if identical else 1


if __name__ == "__main__":
    raise SystemExit(main())
