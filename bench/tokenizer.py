"""Tokenizer stage vs raw HF `tokenizers`, side by side in one process on the same corpus.

1. Training time: `train_tokenizer` (streaming shards, held-out slice, canonical ids, stats, HF layout on disk) vs
   a plain `Tokenizer.train_from_iterator` over the whole text column read at once.
2. Encoding throughput per process: raw `encode_batch` (one thread) vs our `encode_batch_for_datasets` function
   run through `datasets.Dataset.map(batched=True, num_proc=N)` with N = 1 and 2, as the data stage runs it.

Usage: python bench/tokenizer.py [--corpus DIR] [--vocab-size 30522] [--json out.json]
`--corpus` is a corpus stage dir / parquet dir, or a dir of raw .txt and WikiExtractor files, which is first
converted (untimed) into the corpus layout so both sides read the same parquet shards.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bertscale.config import PipelineConfig  # noqa: E402
from bertscale.tokenizer import encode_batch_for_datasets, load_tokenizer, train_tokenizer  # noqa: E402
from bertscale.tokenizer.wordpiece import build_wordpiece, make_trainer  # noqa: E402
from bench.common import cpu_line, raw_documents, write_corpus  # noqa: E402

SHARED = Path(os.environ.get("BERTSCALE_SHARED_DATA", REPO.parent / "shared" / "data"))
GOALS = {"train_time_ratio": ("<=", 1.2), "encode_1proc_vs_raw": (">=", 0.8), "encode_2proc_vs_1proc": (">=", 1.6)}


def prepare_corpus(src: Path, work: Path, shard_docs: int = 20_000) -> Path:
    """The corpus dir to benchmark on: `src` itself if it holds parquet, else raw files converted to shards."""
    if (src / "manifest.json").is_file() or any(src.rglob("*.parquet")):
        return src
    docs = raw_documents(src)
    if not docs:
        raise SystemExit(f"no .txt, WikiExtractor or parquet files under {src}")
    sentences = [[line for line in d.split("\n") if line.strip()] for d in docs]
    return write_corpus({"text": docs, "sentences": sentences}, work / "corpus", shard_docs)


def bench_training(corpus: Path, work: Path, vocab_size: int) -> dict:
    cfg = PipelineConfig(workdir=str(work / "ours"), tokenizer={"vocab_size": vocab_size})
    start = time.perf_counter()
    ours = train_tokenizer(cfg, corpus=corpus)
    ours_s = time.perf_counter() - start

    start = time.perf_counter()
    tok = build_wordpiece(lowercase=True)
    texts = pq.ParquetDataset(sorted(corpus.rglob("*.parquet"))).read(columns=["text"]).column(0).to_pylist()
    batches = (texts[i : i + 1000] for i in range(0, len(texts), 1000))
    tok.train_from_iterator(batches, trainer=make_trainer(cfg.tokenizer))
    raw_s = time.perf_counter() - start
    return {"docs": len(texts), "chars": sum(map(len, texts)), "vocab_size": ours.vocab_size,
            "train_raw_s": raw_s, "train_ours_s": ours_s, "train_time_ratio": ours_s / raw_s,
            "unk_rate": ours.stats["unk_rate"], "tokens_per_word": ours.stats["tokens_per_word"],
            "tokenizer_dir": str(ours.output_dir)}


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (the `datasets.map` workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def bench_encoding(corpus: Path, tok_dir: str, max_docs: int, work: Path) -> dict:
    import datasets

    datasets.disable_progress_bars()
    files = sorted(corpus.rglob("*.parquet"))
    table = pq.ParquetDataset(files).read(columns=["sentences"]).slice(0, max_docs)
    sentences = [s for row in table.column(0).to_pylist() for s in row]
    # Both sides single-threaded per process, so "per process" compares like with like.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    tok = load_tokenizer(tok_dir)
    start = time.perf_counter()
    tokens = 0
    for i in range(0, len(sentences), 1000):
        tokens += sum(len(e.ids) for e in tok.encode_batch(sentences[i : i + 1000], add_special_tokens=False))
    raw_s = time.perf_counter() - start
    result = {"sentences": len(sentences), "tokens": tokens, "encode_raw_tok_s": tokens / raw_s}
    # An on-disk (memory-mapped) dataset, as the data stage has: workers map their shard instead of receiving it.
    pq.write_table(table, work / "sentences.parquet")
    ds = datasets.Dataset.from_parquet(str(work / "sentences.parquet"), cache_dir=str(work / "hf-cache"))
    fn = encode_batch_for_datasets(tok_dir)
    for n in (1, 2):
        start, cpu = time.perf_counter(), _cpu_seconds()
        out = ds.map(fn, batched=True, batch_size=1000, num_proc=n, remove_columns=["sentences"],
                     load_from_cache_file=False, cache_file_name=str(work / f"encoded-{n}.arrow"))
        result[f"encode_{n}proc_tok_s"] = tokens / (time.perf_counter() - start)
        result[f"encode_{n}proc_cpu_s"] = _cpu_seconds() - cpu
        assert len(out) == len(ds)
    result["encode_1proc_vs_raw"] = result["encode_1proc_tok_s"] / result["encode_raw_tok_s"]
    result["encode_2proc_vs_1proc"] = result["encode_2proc_tok_s"] / result["encode_1proc_tok_s"]
    # Wall-clock scaling needs two idle cores; on a shared machine the CPU-time view shows the overhead that
    # parallelism itself adds: 2 x (CPU of 1 process) / (CPU of 2 processes) is the speedup on idle cores.
    result["encode_2proc_cpu_bound_speedup"] = 2 * result["encode_1proc_cpu_s"] / result["encode_2proc_cpu_s"]
    result["load_average_1min"] = os.getloadavg()[0]
    return result


def print_table(r: dict) -> None:
    rows = [
        ("training time (s)", f"{r['train_raw_s']:.2f}", f"{r['train_ours_s']:.2f}", "train_time_ratio"),
        ("encode, 1 process (tok/s)", f"{r['encode_raw_tok_s']:,.0f}", f"{r['encode_1proc_tok_s']:,.0f}",
         "encode_1proc_vs_raw"),
        ("encode, 2 processes (tok/s)", f"{r['encode_1proc_tok_s']:,.0f} (ours x1)", f"{r['encode_2proc_tok_s']:,.0f}",
         "encode_2proc_vs_1proc"),
    ]
    print(f"corpus: {r['docs']:,} docs, {r['chars']:,} chars; vocab {r['vocab_size']}; held-out [UNK] "
          f"{r['unk_rate']:.4%}, {r['tokens_per_word']:.3f} tokens/word; encoded {r['sentences']:,} sentences")
    print(f"{'':30} {'reference':>22} {'ours':>14} {'ratio':>7}  goal")
    for name, ref, ours, key in rows:
        op, goal = GOALS[key]
        print(f"{name:30} {ref:>22} {ours:>14} {r[key]:>7.2f}  {op} {goal}")
    print(f"2 processes, CPU-bound speedup (2 x CPU s of 1 process / CPU s of 2): "
          f"{r['encode_2proc_cpu_bound_speedup']:.2f}; load average before/after the run "
          f"{r['load_average_before']:.2f}/{r['load_average_1min']:.2f} on {r['cpu_count']} cores")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", type=Path, default=SHARED / "corpus",
                    help="Corpus dir (default: the shared corpus: Wikipedia, Gutenberg, WikiText-2).")
    ap.add_argument("--vocab-size", type=int, default=30522)
    # The whole corpus by default: on a 20k-document slice (~3 s of work per process) the two workers' start-up
    # is a visible share of the wall time (1.45x measured there vs 1.71x on all 116k documents).
    ap.add_argument("--encode-docs", type=int, default=None,
                    help="Documents tokenized in the encode benchmark (default: all).")
    ap.add_argument("--json", type=Path, help="Also write the results as JSON here.")
    args = ap.parse_args(argv)
    load_before = os.getloadavg()[0]  # other users' load: wall-clock ratios only mean much when it is low
    with tempfile.TemporaryDirectory() as tmp:
        corpus = prepare_corpus(args.corpus, Path(tmp))
        result = bench_training(corpus, Path(tmp), args.vocab_size)
        result.update(bench_encoding(corpus, result.pop("tokenizer_dir"), args.encode_docs, Path(tmp)))
    result["cpu"], result["cpu_count"], result["load_average_before"] = cpu_line(), os.cpu_count(), load_before
    print(f"cpu: {result['cpu']}")
    print_table(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
