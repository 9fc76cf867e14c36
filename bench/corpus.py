"""Corpus stage throughput: the same cleaning/filter/dedup/sentence functions as a plain single-process loop vs
the Beam stage (local multi-processing runner) with 1 and 2 workers, on the shared Wikipedia extract.

    .venv/bin/python bench/corpus.py [--path DIR_OR_GLOB ...] [--json out.json]

Prints MB/s (input bytes over wall time of the whole stage, start-up and shard writing included) and the
ratios; also checks that the three runs wrote identical shards.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bertscale.config import load_config  # noqa: E402
from bertscale.corpus import run_corpus, run_plain  # noqa: E402

SHARED = Path(os.environ.get("BERTSCALE_SHARED_DATA", REPO.parent / "shared" / "data"))


def timed(fn, cfg) -> tuple[float, dict]:
    start = time.perf_counter()
    result = fn(cfg)
    return time.perf_counter() - start, result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", nargs="+", default=[str(SHARED / "corpus" / "wikipedia")])
    parser.add_argument("--json", help="Also write the results here.")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        variants = [("plain loop", run_plain, 1), ("beam 1 worker", run_corpus, 1), ("beam 2 workers", run_corpus, 2)]
        for name, fn, workers in variants:
            cfg = load_config(None, [f"workdir={tmp}/{workers}-{fn.__name__}",
                                     f"corpus.runner.num_workers={workers}"],
                              extra={"corpus": {"inputs": args.path}})
            seconds, result = timed(lambda c: fn(c, progress=False), cfg)
            mb = result.counts["input_bytes"] / 1e6
            rows.append({"variant": name, "workers": workers, "seconds": round(seconds, 2),
                         "mb_per_s": round(mb / seconds, 2), "kept": result.counts["kept"],
                         "shards_sha256": [s["sha256"] for s in result.manifest["shards"]]})
    plain, one, two = rows
    ratios = {"beam2_vs_beam1": round(one["seconds"] / two["seconds"], 2),
              "beam2_vs_plain": round(plain["seconds"] / two["seconds"], 2),
              "beam1_vs_plain": round(plain["seconds"] / one["seconds"], 2)}
    identical = plain["shards_sha256"] == one["shards_sha256"] == two["shards_sha256"]

    print(f"input: {', '.join(args.path)} ({result.counts['input_bytes'] / 1e6:.1f} MB, {os.cpu_count()} cores)")
    print(f"{'variant':<16}{'seconds':>9}{'MB/s':>8}{'kept docs':>11}")
    for r in rows:
        print(f"{r['variant']:<16}{r['seconds']:>9.2f}{r['mb_per_s']:>8.2f}{r['kept']:>11}")
    print("ratios: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    print(f"identical shards across the three runs: {identical}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "ratios": ratios, "identical": identical}, indent=2))
    return 0 if identical else 1


if __name__ == "__main__":
    raise SystemExit(main())
