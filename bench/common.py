"""What the benchmarks share: the CPU they ran on, and small parquet corpora built from raw shared text."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from bertscale import hardware

DOC = re.compile(r"<doc [^>]*>\n(.*?)</doc>", re.S)


def cpu_facts() -> dict:
    """CPU model, cores and bf16 capability (machines differ from run to run, and a CPU without
    `avx512_bf16`/`amx_bf16` only emulates bf16), as a JSON-able dict."""
    cpu = hardware.cpu_facts()
    return {"model": cpu.model, "cores": cpu.cores, "bf16_flags": cpu.bf16_flags, "native_bf16": cpu.native_bf16}


def cpu_line(cpu: dict | None = None) -> str:
    cpu = cpu or cpu_facts()
    return f"{cpu['model']}, {cpu['cores']} cores, bf16: {', '.join(cpu['bf16_flags']) or 'none (emulated)'}"


def raw_documents(root: Path, max_files: int | None = None) -> list[str]:
    """Article bodies of WikiExtractor files (title line dropped) and blank-line paragraphs of other text files,
    from the first `max_files` files under `root` in name order (UTF-8, else cp1252)."""
    docs: list[str] = []
    for path in sorted(p for p in root.rglob("*") if p.is_file())[:max_files]:
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("cp1252", errors="replace")
        if text.startswith("<doc "):
            bodies = (b.strip().split("\n", 1) for b in DOC.findall(text))
            docs += [b[1].strip() for b in bodies if len(b) == 2 and b[1].strip()]
        elif path.suffix == ".txt":
            docs += [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    return docs


def write_corpus(columns: dict[str, list], out: Path, shard_docs: int) -> Path:
    """Parquet shards of `shard_docs` rows and a manifest listing them, laid out like the corpus stage's output."""
    (out / "shards").mkdir(parents=True)
    rows = len(next(iter(columns.values())))
    shards = []
    for n, start in enumerate(range(0, rows, shard_docs)):
        name = f"shards/part-{n:05d}.parquet"
        pq.write_table(pa.table({k: v[start:start + shard_docs] for k, v in columns.items()}), out / name)
        shards.append({"name": name, "rows": min(shard_docs, rows - start)})
    (out / "manifest.json").write_text(json.dumps({"shards": shards}))
    return out
