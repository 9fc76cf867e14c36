"""The data path at growing corpus sizes: corpus -> tokenizer -> pretraining data, each stage through the CLI.

    .venv/bin/python bench/scale.py --sizes-gb 0.25 1 4 --workdir DIR [--json out.json] [--source DIR]

For every size a corpus is built from the shared Wikipedia extract and Gutenberg texts. Copies of the source
would collapse under deduplication, so copy k replaces the words of a fixed vocabulary (the source's most
frequent words) through the k-th deterministic permutation of that vocabulary: each copy is new text to the
deduplicator while word frequencies, sentence and document lengths stay those of real text. Copy 0 is the
source itself. The files are 64 MB (of text) jsonl.gz in BGZF form, so the corpus stage splits each into work
units of `corpus.bundle_bytes`, as it would a user's bgzipped corpus.

Each stage runs as its own `bertscale` process; its peak resident memory is that of the whole process tree
(launcher plus Beam workers or data processes, summed, sampled every 0.1 s with psutil). Reported per size and
stage: seconds, input MB/s per core, tokens/s (data stage), peak RSS; and the goals of the real-scale data path:
peak memory of each stage grows at most 1.5x from the smallest to the largest size, the data stage stays under
2 GB, and throughput per core does not fall with size.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("BERTSCALE_SHARED_DATA", REPO.parent / "shared" / "data"))
BIN = Path(sys.executable).parent
sys.path.insert(0, str(REPO))

from bench.common import cpu_line  # noqa: E402
from bertscale.corpus.compression import bgzf_compress  # noqa: E402

WORD = re.compile(r"[a-z]+")
VOCAB = 20000  # words permuted per copy: covers ~95% of running words in English text
FILE_BYTES = 64 * 2**20  # generated jsonl.gz files of about this much text each
STAGES = ("corpus", "tokenizer", "data")


# ----------------------------------------------------------------------------------------------------------------
# Corpora of growing size
# ----------------------------------------------------------------------------------------------------------------
def source_documents(source: Path) -> Iterator[str]:
    """Wikipedia articles (WikiExtractor <doc> blocks, title-only stubs skipped) and Gutenberg paragraphs."""
    doc = re.compile(r"<doc[^>]*>\n(.*?)</doc>", re.S)
    for path in sorted((source / "wikipedia").glob("wiki_*")):
        for m in doc.finditer(path.read_text(encoding="utf-8", errors="replace")):
            body = m.group(1).strip()
            if body.count("\n") >= 2:
                yield body
    for path in sorted((source / "gutenberg").rglob("*.txt")):
        text = path.read_text(encoding="utf-8", errors="replace")
        yield from (p.strip() for p in re.split(r"\n\s*\n", text) if len(p.strip()) >= 200)


def permutations(docs: list[str], seed: int = 0) -> tuple[list[str], np.random.Generator]:
    counts = Counter(w for d in docs[:20000] for w in WORD.findall(d.lower()))
    return [w for w, _ in counts.most_common(VOCAB)], np.random.default_rng(seed)


def permuted(text: str, table: dict[str, str]) -> str:
    def swap(m: re.Match[str]) -> str:
        w = m.group(0)
        new = table.get(w.lower())
        if new is None:
            return w
        return new.capitalize() if w[:1].isupper() else new

    return re.sub(r"[A-Za-z]+", swap, text)


class _BgzfWriter:
    """A .jsonl.gz file written as BGZF (what `bgzip` writes; any gzip reader reads it), so that the corpus stage
    splits it into work units like any large input instead of giving each file to one worker."""

    CHUNK = 0xFF00 * 64

    def __init__(self, path: Path) -> None:
        self._fh, self._buf = open(path, "wb"), bytearray()

    def write(self, data: bytes) -> None:
        self._buf += data
        if len(self._buf) >= self.CHUNK:
            self._fh.write(bgzf_compress(bytes(self._buf), level=1, eof=False))
            self._buf.clear()

    def close(self) -> None:
        self._fh.write(bgzf_compress(bytes(self._buf), level=1, eof=True))
        self._fh.close()


def build_corpus(out: Path, size_gb: float, source: Path) -> float:
    """BGZF jsonl.gz files holding about `size_gb` GB of text; returns the MB written (uncompressed text)."""
    done = out / "_complete-bgzf"
    if done.exists():
        return float(done.read_text())
    out.mkdir(parents=True, exist_ok=True)
    docs = list(source_documents(source))
    vocab, rng = permutations(docs)
    target, written, copy, part = size_gb * 1e9, 0, 0, 0
    f, in_file = None, 0
    while written < target:
        table = {} if copy == 0 else dict(zip(vocab, (vocab[i] for i in rng.permutation(len(vocab)))))
        for d in docs:
            if f is None or in_file >= FILE_BYTES:
                if f is not None:
                    f.close()
                f, in_file, part = _BgzfWriter(out / f"part-{part:05d}.jsonl.gz"), 0, part + 1
            text = permuted(d, table) if table else d
            f.write((json.dumps({"text": text}) + "\n").encode())
            n = len(text.encode())
            written, in_file = written + n, in_file + n
            if written >= target:
                break
        copy += 1
    f.close()
    done.write_text(str(written / 1e6))
    return written / 1e6


# ----------------------------------------------------------------------------------------------------------------
# One stage, measured
# ----------------------------------------------------------------------------------------------------------------
def run_measured(cmd: list[str], log: Path) -> tuple[float, float]:
    """(seconds, peak RSS in MB of the process tree) of one command; raises if it fails."""
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = psutil.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        peak = 0
        while proc.poll() is None:
            try:
                tree = [proc, *proc.children(recursive=True)]
                rss = 0
                for p in tree:
                    try:
                        rss += p.memory_info().rss
                    except psutil.Error:
                        pass
                peak = max(peak, rss)
            except psutil.Error:
                pass
            time.sleep(0.1)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:3])} failed ({proc.returncode}); see {log}:\n"
                         + "\n".join(log.read_text().splitlines()[-15:]))
    return seconds, peak / 2**20


def data_tokens(data_dir: Path) -> int:
    """Tokens the data stage wrote, from its manifest (whatever the nesting of its per-shard counts)."""
    manifest = json.loads((data_dir / "manifest.json").read_text())
    for key in ("corpus_tokens", "tokens", "total_tokens"):
        for where in (manifest, manifest.get("stats", {}), manifest.get("counts", {})):
            if isinstance(where, dict) and isinstance(where.get(key), int):
                return where[key]
    return 0


def run_size(size_gb: float, workdir: Path, source: Path, workers: int, only: list[str]) -> dict:
    root = workdir / f"{size_gb:g}gb"
    raw = root / "raw"
    t0 = time.perf_counter()
    mb = build_corpus(raw, size_gb, source)
    print(f"  {size_gb:g} GB: corpus of {mb:,.0f} MB built in {time.perf_counter() - t0:.0f} s", flush=True)
    common = ["--no-tracking", "--workdir", str(root / "work")]
    cli = [str(BIN / "bertscale")]
    stages = {
        "corpus": cli + ["corpus", *common, "--format", "jsonl", "--num-workers", str(workers), str(raw)],
        "tokenizer": cli + ["tokenizer", *common],
        "data": cli + ["data", *common, "--num-proc", str(workers)],
    }
    result: dict = {"size_gb": size_gb, "input_mb": round(mb, 1), "stages": {}}
    for name, cmd in stages.items():
        if name not in only:
            continue
        seconds, peak = run_measured(cmd, root / f"{name}.log")
        rec = {"seconds": round(seconds, 1), "peak_rss_mb": round(peak), "input_mb": round(mb, 1),
               "mb_per_s_per_core": round(mb / seconds / workers, 2)}
        if name == "data":
            tokens = data_tokens(root / "work" / "data")
            rec.update(tokens=tokens, tokens_per_s=round(tokens / seconds))
        result["stages"][name] = rec
        print(f"    {name:<10}{seconds:>8.1f} s{rec['mb_per_s_per_core']:>8.2f} MB/s/core{peak:>9,.0f} MB peak",
              flush=True)
    return result


def goals(runs: list[dict]) -> dict:
    first, last = runs[0]["stages"], runs[-1]["stages"]
    out = {}
    for stage in first:
        growth = last[stage]["peak_rss_mb"] / max(first[stage]["peak_rss_mb"], 1)
        speed = last[stage]["mb_per_s_per_core"] / max(first[stage]["mb_per_s_per_core"], 1e-9)
        out[stage] = {"memory_growth": round(growth, 2), "memory_ok": growth <= 1.5,
                      "throughput_ratio": round(speed, 2), "throughput_ok": speed >= 0.9}
    if "data" in out:
        out["data"]["under_2gb"] = all(r["stages"]["data"]["peak_rss_mb"] < 2048 for r in runs)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes-gb", nargs="+", type=float, default=[0.25, 1.0])
    p.add_argument("--workdir", required=True, type=Path, help="Generated corpora and stage outputs go here.")
    p.add_argument("--source", type=Path, default=SHARED / "corpus", help="The shared corpus folder.")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="Beam workers / data processes.")
    p.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES),
                   help="Stages to measure (each reads the previous stage's output in the workdir).")
    p.add_argument("--json", type=Path, help="Also write the results here.")
    args = p.parse_args()
    print(cpu_line(), flush=True)
    runs = [run_size(s, args.workdir, args.source, args.workers, args.stages) for s in sorted(args.sizes_gb)]
    print(f"\n{'size GB':>8} {'stage':<10}{'seconds':>9}{'MB/s/core':>11}{'peak MB':>9}{'tokens/s':>11}")
    for r in runs:
        for name, s in r["stages"].items():
            print(f"{r['size_gb']:>8g} {name:<10}{s['seconds']:>9.1f}{s['mb_per_s_per_core']:>11.2f}"
                  f"{s['peak_rss_mb']:>9,}{s.get('tokens_per_s', ''):>11}")
    summary = goals(runs) if len(runs) > 1 else {}
    for stage, g in summary.items():
        print(f"{stage}: {g}")
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_line(), "workers": args.workers, "runs": runs,
                                         "goals": summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
