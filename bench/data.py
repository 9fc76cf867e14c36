"""Pretraining-data stage vs raw `tokenizers` `encode_batch`, side by side in one run on the same corpus shards.

1. Throughput per process: the whole stage (`build_pretraining_data` with data.num_proc=1: parquet reading, the
   NSP B pool, tokenization, filtering, instance creation, writing the shards and their checksums) against raw
   `Tokenizer.encode_batch` over the very same sentences, already read into memory, both on one thread.
   Goal: the stage reaches >= 60% of the raw tokens/s. Throughput is per CPU second of this process (both sides
   single-threaded), which other load on a shared machine disturbs far less than wall time.
2. Peak memory (`--memory`): the stage run in a fresh process on the first half of the shards and on all of
   them; the peak RSS should stay flat (bounded by a shard), not grow with the corpus.

Usage: python bench/data.py [--corpus DIR] [--files 16] [--shard-docs 2000] [--memory] [--json out.json]
`--corpus` is a corpus stage dir, or a dir of WikiExtractor / .txt files (default: the shared Wikipedia extract),
converted (untimed) into the corpus layout with a simple sentence splitter.
"""

from __future__ import annotations

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one thread on both sides: a per-process comparison

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import pyarrow.parquet as pq  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bertscale.config import PipelineConfig  # noqa: E402
from bertscale.data import build_pretraining_data  # noqa: E402
from bertscale.data.build import corpus_shards  # noqa: E402
from bertscale.tokenizer import load_tokenizer  # noqa: E402
from bench.common import cpu_facts, raw_documents, write_corpus  # noqa: E402

SHARED = Path(os.environ.get("BERTSCALE_SHARED_DATA", REPO.parent / "shared" / "data"))
GOAL_RATIO = 0.6
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def prepare_corpus(src: Path, work: Path, max_files: int, shard_docs: int) -> Path:
    """`src` itself if it is a corpus stage dir, else its raw files converted into parquet shards of sentences."""
    if (src / "manifest.json").is_file():
        return src
    docs = raw_documents(src, max_files)
    if not docs:
        raise SystemExit(f"no .txt or WikiExtractor files under {src}")
    sentences = [[s for ln in d.split("\n") if ln.strip() for s in SENTENCE_END.split(ln.strip()) if s]
                 for d in docs]
    return write_corpus({"doc_id": [str(i) for i in range(len(docs))], "sentences": sentences}, work / "corpus",
                        shard_docs)


def train_tokenizer(corpus: Path, out: Path, vocab_size: int) -> Path:
    """A BERT WordPiece vocabulary trained (untimed) on the first shard."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, trainers
    from tokenizers.models import WordPiece

    first = corpus_shards(corpus)[0][0]
    texts = [" ".join(s) for s in pq.read_table(first, columns=["sentences"]).column(0).to_pylist()]
    tok = Tokenizer(WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    return out


def bench_raw(corpus: Path, tok_dir: Path) -> dict[str, float]:
    """Raw encode_batch over every sentence of every shard, batch by batch as the stage does (text pre-read)."""
    tok = load_tokenizer(tok_dir)
    batches = []
    for shard in corpus_shards(corpus)[0]:
        for b in pq.ParquetFile(shard).iter_batches(batch_size=1024, columns=["sentences"]):
            batches.append(b.column(0).flatten().to_pylist())
    start, cpu, tokens = time.perf_counter(), time.process_time(), 0
    for texts in batches:
        tokens += sum(len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False))
    return {"seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu, "tokens": tokens}


def bench_ours(corpus: Path, tok_dir: Path, work: Path, seq_len: int, mode: str, pool: int) -> dict[str, float]:
    cfg = PipelineConfig.model_validate({"workdir": str(work), "tracking": {"enabled": False}, "data": {
        "num_proc": 1, "seq_lengths": [seq_len], "mode": mode, "nsp_pool_documents": pool}})
    start, cpu = time.perf_counter(), time.process_time()
    result = build_pretraining_data(cfg, corpus=corpus, tokenizer=tok_dir)
    s = result.stats
    return {"seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu,
            "corpus_tokens": s["corpus_tokens"],
            "instances": s[f"seq{seq_len}.train.instances"] + s[f"seq{seq_len}.heldout.instances"],
            "documents": s["documents"], "shards": s["shards"]}


def vm_hwm_mib() -> float:
    """Peak RSS of this process from /proc (VmHWM starts afresh at exec; ru_maxrss would carry the parent's)."""
    m = re.search(r"^VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    return int(m.group(1)) / 1024 if m else float("nan")


def peak_rss(corpus: Path, tok_dir: Path, work: Path, seq_len: int, mode: str, pool: int) -> dict[str, float]:
    """Run the stage in a fresh process (data.num_proc=1: no workers); its peak RSS in MiB and its tokens."""
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import bench.data as b; base = b.vm_hwm_mib(); "
            "r = b.bench_ours(*map(b.Path, sys.argv[2:5]), int(sys.argv[5]), sys.argv[6], int(sys.argv[7])); "
            "r['peak_rss_mib'], r['rss_after_imports_mib'] = b.vm_hwm_mib(), base; print(json.dumps(r))")
    out = subprocess.run([sys.executable, "-c", code, str(REPO), str(corpus), str(tok_dir), str(work),
                          str(seq_len), mode, str(pool)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def half_corpus(corpus: Path, work: Path) -> Path:
    """A corpus dir listing the first half of `corpus`'s shards (same files, no copy)."""
    shards = corpus_shards(corpus)[0]
    out = work / "half"
    out.mkdir(parents=True)
    names = [str(p.resolve()) for p in shards[: max(1, len(shards) // 2)]]
    (out / "manifest.json").write_text(json.dumps({"shards": [{"name": n} for n in names]}))
    return out


def print_table(r: dict) -> None:
    cpu = r["cpu"]
    print(f"CPU: {cpu['model']} ({cpu['cores']} cores), bf16 flags: {' '.join(cpu['bf16_flags']) or 'none'}")
    if "ratio" in r:
        raw, ours = r["raw_encode_batch"], r["ours"]
        print(f"corpus: {ours['shards']} shards, {ours['documents']} documents, {raw['tokens']:,} tokens; "
              f"mode {r['mode']}, seq {r['seq_len']}, B pool {r['pool']} documents per split")
        print(f"{'':34}{'wall s':>10}{'CPU s':>10}{'tokens/CPU s':>14}")
        for name, x in (("raw tokenizers encode_batch", raw), ("bertscale data (whole stage)", ours)):
            print(f"{name:34}{x['seconds']:>10.2f}{x['cpu_seconds']:>10.2f}{x['tokens'] / x['cpu_seconds']:>14,.0f}")
        verdict = "ok" if r["ratio"] >= GOAL_RATIO else "BELOW GOAL"
        print(f"ratio ours/raw: {r['ratio']:.2f} (goal >= {GOAL_RATIO}: {verdict})")
    for m in r.get("memory", []):
        print(f"peak RSS, {m['shards']} shards / {m['corpus_tokens']:,} tokens: {m['peak_rss_mib']:.0f} MiB "
              f"({m['rss_after_imports_mib']:.0f} MiB after imports)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", type=Path, default=SHARED / "corpus" / "wikipedia")
    ap.add_argument("--files", type=int, default=16, help="Raw files to read from --corpus.")
    ap.add_argument("--shard-docs", type=int, default=2000, help="Documents per converted corpus shard.")
    ap.add_argument("--vocab-size", type=int, default=30522)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--mode", choices=["nsp", "packed"], default="nsp")
    ap.add_argument("--repeat", type=int, default=3,
                    help="Interleaved runs of each side; the fastest counts (0: memory only).")
    ap.add_argument("--pool", type=int, default=20000, help="data.nsp_pool_documents (the config's default).")
    ap.add_argument("--memory", action="store_true", help="Also measure peak RSS at two corpus sizes.")
    ap.add_argument("--json", type=Path, help="Also write the results as JSON here.")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        corpus = prepare_corpus(args.corpus, work, args.files, args.shard_docs)
        tok_dir = train_tokenizer(corpus, work / "tokenizer", args.vocab_size)
        # Interleaved repeats, the fastest of each side: other load on a shared machine only ever slows a run.
        raws, ourses = [], []
        for i in range(args.repeat):
            raws.append(bench_raw(corpus, tok_dir))
            ourses.append(bench_ours(corpus, tok_dir, work / f"ours{i}", args.seq_len, args.mode, args.pool))
        r: dict = {"cpu": cpu_facts(), "mode": args.mode, "seq_len": args.seq_len, "pool": args.pool}
        if args.repeat:
            raw, ours = min(raws, key=lambda x: x["cpu_seconds"]), min(ourses, key=lambda x: x["cpu_seconds"])
            ours["tokens"] = raw["tokens"]  # the same text on both sides: the ratio of times is that of speeds
            r.update(raw_encode_batch=raw, ours=ours, ratio=raw["cpu_seconds"] / ours["cpu_seconds"])
        if args.memory:
            r["memory"] = [peak_rss(c, tok_dir, work / f"mem{i}", args.seq_len, args.mode, args.pool)
                           for i, c in enumerate((half_corpus(corpus, work), corpus))]
    print_table(r)
    if args.json:
        args.json.write_text(json.dumps(r, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
