"""The launcher's side of the corpus stage: the manifest built from the pipeline's small summary, the
document-count invariant, and the result handed to callers. Nothing here reads corpus text."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from bertscale.config import CorpusConfig, is_uri
from bertscale.corpus.dedup import lsh_params
from bertscale.corpus.filters import RULE_NAMES
from bertscale.corpus.output import SHARD_SCHEMA, join, read_bytes
from bertscale.errors import InputError
from bertscale.tracking import StageRecord

BASE_COUNTS = ("read", "passed", "kept", "filtered", "duplicates", "exact_duplicates", "near_duplicates",
               "quarantined", "decontaminated", "decontaminated_edited", "decontaminated_passages",
               "utf8_repaired_docs", "invalid_utf8_bytes", "unparsed_lines", "unterminated_docs")
_TASK, _SPLIT = "decontaminated_task_", "decontaminated_split_"


@dataclass
class CorpusResult:
    """Where the stage wrote (a Path for a local output, the URI string for gs:// & co.) and what it counted."""

    output_dir: Path | str
    manifest_path: Path | str
    manifest: dict
    counts: dict[str, int]
    seconds: float = 0.0
    manifest_sha256: str = ""

    def summary(self) -> str:
        c = self.counts
        rules = ", ".join(f"{r}={c[f'filtered_{r}']}" for r in RULE_NAMES if c.get(f"filtered_{r}"))
        tasks = ", ".join(f"{k.removeprefix(_TASK)}={v}" for k, v in sorted(c.items()) if k.startswith(_TASK) and v)
        decontaminated = [] if not self.manifest.get("decontamination", {}).get("active") else [
            f"  decontaminated {c['decontaminated']}, edited {c['decontaminated_edited']} "
            f"({c['decontaminated_passages']} passages removed){f'; documents per task: {tasks}' if tasks else ''}"]
        return "\n".join([
            f"corpus: read {c['read']} documents from {c['files']} files ({c['input_bytes'] / 2**20:.1f} MiB)",
            f"  kept {c['kept']} ({c['sentences']} sentences), filtered {c['filtered']}"
            + (f" ({rules})" if rules else ""),
            f"  duplicates {c['duplicates']} (exact {c['exact_duplicates']}, near {c['near_duplicates']}), "
            f"quarantined {c['quarantined']}",
            *decontaminated,
            f"  {c['shards']} shard(s), {c['output_text_bytes'] / 2**20:.1f} MiB of text -> {self.output_dir}",
        ])

    def record(self) -> StageRecord:
        """For tracking: the corpus section, per-rule counts, the manifest and quarantine (or, for an object
        store output, where they stay), and the manifest's hash."""
        rec = StageRecord("corpus", metrics={f"corpus.{k}": v for k, v in self.counts.items()},
                          tags={"bertscale.corpus_manifest_sha256": self.manifest_sha256})
        if is_uri(str(self.output_dir)):
            rec.tags["bertscale.corpus_output"] = str(self.output_dir)
        else:
            extra = [Path(self.output_dir) / name for name in ("quarantine.jsonl", "decontamination.jsonl")]
            rec.artifacts = [(Path(self.manifest_path), None)] + [(f, None) for f in extra if f.exists()]
        return rec


def _first_quarantine_reason(out_dir: str) -> str:
    try:
        first = read_bytes(join(out_dir, "quarantine.jsonl")).split(b"\n", 1)[0]
        return json.loads(first)["reason"] if first else ""
    except (OSError, ValueError, KeyError):
        return ""


def nothing_kept(counts: dict[str, int], out_dir: str) -> InputError:
    rules = sorted(((counts.get(f"filtered_{r}", 0), r) for r in RULE_NAMES if counts.get(f"filtered_{r}")),
                   reverse=True)
    parts = [f"{r}: {n}" for n, r in rules]
    hint = ""
    if rules:
        top = rules[0][1]
        hint = f"; relax corpus.filters.{top}" if top != "empty" else "; the inputs hold no text after cleaning"
    if counts.get("quarantined"):
        parts.append(f"quarantined: {counts['quarantined']} (e.g. {_first_quarantine_reason(out_dir)})")
    if counts.get("duplicates"):
        parts.append(f"duplicates: {counts['duplicates']}")
    if counts.get("decontaminated"):
        parts.append(f"decontaminated: {counts['decontaminated']} (see decontamination.jsonl)")
    return InputError(f"no documents survived the corpus stage (read {counts.get('read', 0)}; dropped by "
                      f"{', '.join(parts) or 'nothing'}){hint}")


def check_invariant(counts: dict[str, int]) -> None:
    """read = kept + filtered + duplicates + quarantined + decontaminated: a document lost or counted twice is a
    bug."""
    parts = ("kept", "filtered", "duplicates", "quarantined", "decontaminated")
    if counts["read"] != sum(counts[p] for p in parts):
        raise RuntimeError(f"corpus invariant violated: read {counts['read']} != "
                           + " + ".join(f"{p} {counts[p]}" for p in parts))


def decontamination_section(cfg: CorpusConfig, counts: dict[str, int], index: dict | None) -> dict:
    """The manifest's account of decontamination: settings, the eval files read and the index built from them,
    and the documents that matched per task and split (moved out of the flat counts)."""
    d = cfg.decontamination
    tasks = sorted({e.task for e in d.eval_files}) if index is not None else []
    for task in tasks:
        counts.setdefault(f"{_TASK}{task}", 0)  # a task without matches is counted 0, not missing
    documents: dict[str, dict[str, int]] = {}
    for key in sorted(k for k in counts if k.startswith(_SPLIT)):
        task, _, split = key.removeprefix(_SPLIT).rpartition("/")
        documents.setdefault(task, {})[split] = counts.pop(key)
    return {"active": index is not None, "ngram": d.ngram, "mode": d.mode, **(index or {}),
            "documents": documents, "report": "decontamination.jsonl"}


def build_manifest(cfg: CorpusConfig, summary: dict, out_dir: str, n_files: int, input_bytes: int,
                   decontamination: dict | None = None) -> tuple[dict, dict[str, int]]:
    """The manifest and the full counts from the pipeline's summary; raises when nothing was kept.
    `decontamination` is what the launcher's eval index holds (None when decontamination is off)."""
    counts = {k: int(v) for k, v in summary["counts"].items()}
    unconverged = counts.pop("unconverged_edges", 0)
    shards = summary["shards"]
    for name in (*BASE_COUNTS, *(f"filtered_{rule}" for rule in RULE_NAMES)):
        counts.setdefault(name, 0)  # every key always present, so metrics line up across runs
    decontaminated = decontamination_section(cfg, counts, decontamination)
    counts["duplicates"] = counts["exact_duplicates"] + counts["near_duplicates"]
    counts["kept"] = sum(s["rows"] for s in shards)
    if counts["kept"] == 0:
        raise nothing_kept(counts, out_dir)
    check_invariant(counts)
    counts.update(files=n_files, units=summary["plan"]["units"], shards=len(shards), input_bytes=input_bytes,
                  output_text_bytes=sum(s["text_bytes"] for s in shards),
                  sentences=sum(s["sentences"] for s in shards))
    bands, rows = lsh_params(cfg.dedup.threshold, cfg.dedup.num_perm)
    manifest = {
        "version": 1,
        "shards": [{"name": s["name"], "rows": s["rows"], "bytes": s["bytes"], "sha256": s["sha256"]}
                   for s in shards],
        "counts": dict(sorted(counts.items())),
        "config": cfg.model_dump(mode="json"),
        "inputs": summary["inputs"],
        "schema": {name: _TYPE_NAMES.get(name, str(SHARD_SCHEMA.field(name).type)) for name in SHARD_SCHEMA.names},
        "lsh": {"bands": bands, "rows": rows},
        "near_dedup": {"buckets": summary["plan"]["buckets"], "cluster_rounds": cfg.dedup.cluster_rounds,
                       "unconverged_edges": unconverged},
        "decontamination": decontaminated,
    }
    return manifest, counts


_TYPE_NAMES = {"sentences": "list<string>", "metadata": "string (JSON object)"}
