"""The corpus stage: the Beam graph, its single-process twin, and `run_corpus`.

Shape of the graph (only keys and document ids are shuffled; document text never crosses a shuffle):

    work units --GroupByKey(spread)--> ProcessUnit --+--> exact keys  --GroupByKey(bucket)--> exact drops --> json
      (byte ranges of the inputs)     read, clean,   +--> LSH bands   --GroupByKey(bucket)--> candidate pairs -> json
                                      filter, split, |
                                      hash; writes   +--> (spill parquet + counts/quarantine json per unit)
    input files --GroupByKey(spread)--> sha256 fingerprints --> json

After the pipeline, `finalize` verifies near-duplicate candidates against their MinHash signatures, clusters them
(union-find, smallest doc id kept), streams the spill files in document order into size-balanced shards, and
writes the quarantine list and the manifest. It checks read = kept + filtered + duplicates + quarantined.
`run_plain` runs the same per-unit work and the same resolution in one process: the reference for benchmarks and
for tests that Beam's output equals it byte for byte.
"""

from __future__ import annotations

import difflib
import hashlib
import logging
import os
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import apache_beam as beam
import numpy as np

from bertscale.config import CorpusConfig, PipelineConfig, RunnerConfig, is_uri
from bertscale.corpus.cleaning import clean_text
from bertscale.corpus.dedup import (
    MinHasher,
    band_keys,
    bucket_of,
    candidate_pairs,
    exact_duplicates,
    exact_key,
    lsh_params,
    near_duplicates,
)
from bertscale.corpus.filters import RULE_NAMES, build_rules, first_failed_rule
from bertscale.corpus.output import (
    SpillWriter,
    delete_matching,
    delete_tree,
    file_fingerprint,
    join,
    metadata_json,
    read_bytes,
    read_json,
    read_spill,
    write_json,
    write_json_atomic,
    write_quarantine,
    write_shards,
)
from bertscale.corpus.readers import (
    InputFile,
    Record,
    Rejected,
    WorkUnit,
    doc_sort_key,
    expand_inputs,
    make_doc_id,
    plan_units,
    read_unit,
)
from bertscale.corpus.sentences import split_sentences
from bertscale.errors import ConfigError, InputError

log = logging.getLogger(__name__)
BASE_COUNTS = ("read", "passed", "kept", "filtered", "duplicates", "exact_duplicates", "near_duplicates",
               "quarantined", "utf8_repaired_docs", "invalid_utf8_bytes", "unparsed_lines", "unterminated_docs")
NUM_BUCKETS = 32  # shuffle buckets for dedup keys: enough to spread work, few enough to keep elements fat


# ------------------------------------------------------------------------------------------------------------
# Per-unit work (runs in the Beam workers, or in-process for the plain loop)
# ------------------------------------------------------------------------------------------------------------
@dataclass
class UnitKeys:
    """What a processed unit sends through the shuffle: dedup keys with document ids, nothing else."""

    index: int
    exact: list[tuple[str, str]] = field(default_factory=list)  # (exact key, doc id)
    bands: list[tuple[int, str]] = field(default_factory=list)  # (LSH band key, doc id)


def spill_path(work_dir: str, index: int) -> str:
    return join(work_dir, "units", f"unit-{index:06d}.parquet")


def sidecar_path(work_dir: str, index: int) -> str:
    return join(work_dir, "units", f"unit-{index:06d}.json")


class UnitProcessor:
    """Reads, cleans, filters, splits and hashes the documents of one work unit."""

    def __init__(self, cfg: CorpusConfig, work_dir: str) -> None:
        self.cfg, self.work_dir = cfg, work_dir
        self.rules = build_rules(cfg.filters)
        d = cfg.dedup
        self.hasher = MinHasher(d.num_perm, d.shingle_size, d.seed) if d.near else None
        self.bands, self.rows = lsh_params(d.threshold, d.num_perm)

    def __call__(self, index: int, unit: WorkUnit) -> UnitKeys:
        counts: Counter[str] = Counter()
        quarantine: list[dict] = []
        keys = UnitKeys(index)
        writer = SpillWriter(spill_path(self.work_dir, index))
        for item in guarded_records(unit, self.cfg, counts):
            counts["read"] += 1
            if isinstance(item, Record):
                if item.invalid_bytes:
                    counts["utf8_repaired_docs"] += 1
                    counts["invalid_utf8_bytes"] += item.invalid_bytes
                item = self._guarded_document(unit, item, counts, keys, writer)
            if isinstance(item, Rejected):
                counts["quarantined"] += 1
                quarantine.append({"file": unit.file.path, "position": item.position, "reason": item.reason})
        writer.close()
        write_json(sidecar_path(self.work_dir, index), {"counts": dict(counts), "quarantine": quarantine})
        return keys

    def _guarded_document(self, unit: WorkUnit, record: Record, counts: Counter[str], keys: UnitKeys,
                          writer: SpillWriter) -> Rejected | None:
        """`_document`, with any error it raises turned into a quarantined record: one pathological document
        must cost that document, not the whole job."""
        try:
            self._document(unit, record.position, record.text, record.metadata, counts, keys, writer)
        except Exception as err:
            log.warning("corpus: %s position %d failed and is quarantined", unit.file.path, record.position,
                        exc_info=True)
            return Rejected(record.position, _failure_reason("processing failed", err))
        return None

    def _document(self, unit: WorkUnit, position: int, raw: str, metadata: dict, counts: Counter[str],
                  keys: UnitKeys, writer: SpillWriter) -> None:
        # Everything is computed before anything is recorded, so a failure part-way leaves no trace of the document.
        text = clean_text(raw, self.cfg.normalization, self.cfg.strip_markup)
        rule = first_failed_rule(text, self.rules)
        if rule is not None:
            counts["filtered"] += 1
            counts[f"filtered_{rule}"] += 1
            return
        doc_id = make_doc_id(unit.file.rel, position)
        signature = self.hasher.signature(text) if self.hasher is not None else None
        bands = band_keys(signature, self.bands, self.rows) if signature is not None else []
        exact = exact_key(text) if self.cfg.dedup.exact else None
        sentences = split_sentences(text, self.cfg.min_sentence_chars)
        meta = metadata_json(metadata)
        if exact is not None:
            keys.exact.append((exact, doc_id))
        keys.bands.extend((k, doc_id) for k in bands)
        writer.add(doc_id, text, sentences, unit.file.path, meta, None if signature is None else signature.tobytes())
        counts["passed"] += 1


def _failure_reason(what: str, err: BaseException) -> str:
    first_line = (str(err).splitlines() or [""])[0]
    return f"{what}: {type(err).__name__}: {first_line[:200]}"


def guarded_records(unit: WorkUnit, cfg: CorpusConfig, counts: Counter[str]) -> Iterator[Record | Rejected]:
    """`read_unit`, with an unexpected reader error turned into one rejected record (the records before it are
    kept, as for a truncated archive) instead of an exception that fails the job."""
    last = unit.start
    try:
        for item in read_unit(unit, cfg, counts):
            last = item.position
            yield item
    except Exception as err:
        log.warning("corpus: reading %s failed after position %d", unit.file.path, last, exc_info=True)
        yield Rejected(last, _failure_reason(f"reader failed after position {last}", err) + "; records before "
                             "it were kept")


# ------------------------------------------------------------------------------------------------------------
# Dedup resolution on buckets (pure; the Beam graph and the plain loop both call these)
# ------------------------------------------------------------------------------------------------------------
def exact_buckets(keys: UnitKeys, buckets: int) -> Iterator[tuple[int, list[tuple[str, str]]]]:
    parts: dict[int, list[tuple[str, str]]] = {}
    for key, doc_id in keys.exact:
        parts.setdefault(bucket_of(key, buckets), []).append((key, doc_id))
    yield from parts.items()


def band_buckets(keys: UnitKeys, buckets: int) -> Iterator[tuple[int, list[tuple[int, str]]]]:
    parts: dict[int, list[tuple[int, str]]] = {}
    for key, doc_id in keys.bands:
        parts.setdefault(bucket_of(key, buckets), []).append((key, doc_id))
    yield from parts.items()


def exact_drops_in_bucket(groups: Iterable[list[tuple[str, str]]]) -> list[str]:
    return exact_duplicates((pair for group in groups for pair in group), doc_sort_key)


def candidates_in_bucket(groups: Iterable[list[tuple[int, str]]]) -> list[tuple[str, str]]:
    by_band: dict[int, list[str]] = {}
    for group in groups:
        for key, doc_id in group:
            by_band.setdefault(key, []).append(doc_id)
    pairs: list[tuple[str, str]] = []
    for ids in by_band.values():
        if len(ids) > 1:
            pairs.extend(candidate_pairs(ids, doc_sort_key))
    return pairs


# ------------------------------------------------------------------------------------------------------------
# The Beam graph
# ------------------------------------------------------------------------------------------------------------
class ProcessUnitFn(beam.DoFn):
    """`UnitProcessor` as a DoFn: built once per worker (MinHash permutations, rules), fed (key, [unit])."""

    def __init__(self, cfg: CorpusConfig, work_dir: str) -> None:
        self.cfg, self.work_dir = cfg, work_dir
        self.processor: UnitProcessor | None = None

    def setup(self) -> None:
        self.processor = UnitProcessor(self.cfg, self.work_dir)

    def process(self, element: tuple[int, Iterable[WorkUnit]]) -> Iterator[UnitKeys]:
        index, units = element
        for unit in units:
            yield self.processor(index, unit)


def write_json_to(obj: object, path: str) -> None:
    write_json(path, obj)


def _runner_names() -> dict[str, str]:
    """Beam's own runner lookup: a runner's class name, case-insensitive, with or without the `Runner` suffix."""
    from apache_beam.options.pipeline_options import StandardOptions

    names = {path.rsplit(".", 1)[-1]: path for path in StandardOptions.ALL_KNOWN_RUNNERS}
    return {**{n.lower(): n for n in names}, **{n.lower().removesuffix("runner"): n for n in names}}


def check_runner_name(name: str, field: str = "corpus.runner.runner") -> None:
    """ConfigError for a runner Beam would not find (a typo), naming the closest known runner."""
    if "." in name:  # a fully qualified PipelineRunner class; Beam imports it itself
        return
    known = _runner_names()
    if name.lower() not in known:
        close = difflib.get_close_matches(name.lower(), known, n=1)
        hint = f"did you mean {known[close[0]]}? " if close else ""
        raise ConfigError(f"{field}={name!r} is not a Beam runner: {hint}use one of "
                          f"{', '.join(sorted(set(known.values())))} or a fully qualified runner class")


def check_pipeline_options(flags: list[str]) -> None:
    """ConfigError for options no Beam options class knows: Beam would only log a warning and drop them."""
    from apache_beam.options.pipeline_options import PipelineOptions

    malformed = [f for f in flags if not f.startswith("--") or f == "--"]
    if malformed:
        raise ConfigError(f"corpus.runner.pipeline_options {malformed} must be of the form --name=value")
    options = PipelineOptions(flags)
    beam_log = logging.getLogger("apache_beam.options.pipeline_options")
    level = beam_log.level
    beam_log.setLevel(logging.ERROR)  # Beam warns about what it drops; the ConfigError below says it better
    try:
        known = set(options.get_all_options())
    finally:
        beam_log.setLevel(level)
    unknown = sorted(set(options.get_all_options(retain_unknown_options=True)) - known)
    if unknown:
        hints = [f"--{u} (did you mean --{close[0]}?)" if (close := difflib.get_close_matches(u, known, n=1))
                 else f"--{u}" for u in unknown]
        raise ConfigError(f"corpus.runner.pipeline_options: unknown Beam option(s) {', '.join(hints)}; fix or "
                          "remove them (Beam would silently drop them)")
    for flag in flags:
        if flag.startswith("--runner="):
            check_runner_name(flag.split("=", 1)[1], "corpus.runner.pipeline_options --runner")


def validate_runner(runner: RunnerConfig) -> None:
    """Reject a misspelt runner or an unknown pipeline option up front, before any input is read."""
    check_runner_name(runner.runner)
    check_pipeline_options(list(runner.pipeline_options))


def beam_options(runner: RunnerConfig):
    """Pipeline options: the local DirectRunner in multi-processing mode (never Prism), or any runner's flags."""
    from apache_beam.options.pipeline_options import PipelineOptions

    args = [f"--runner={runner.runner}"]
    if runner.runner in ("DirectRunner", "direct"):
        workers = runner.num_workers or os.cpu_count() or 1
        args += ["--direct_running_mode=multi_processing", f"--direct_num_workers={workers}"]
    return PipelineOptions(args + list(runner.pipeline_options))


def build_graph(p, units: list[WorkUnit], files: list[InputFile], cfg: CorpusConfig, work_dir: str) -> None:
    """Add the corpus stage to pipeline `p`; its results land as JSON files under `work_dir`."""
    # Biggest units first: the runner deals grouped keys round-robin to workers, which then balances well.
    order = sorted(range(len(units)), key=lambda i: (-(units[i].file.size if units[i].end is None
                                                        else units[i].end - units[i].start), i))
    keys = (
        p
        | "Units" >> beam.Create([(i, units[i]) for i in order], reshuffle=False)
        | "SpreadUnits" >> beam.GroupByKey()
        | "Process" >> beam.ParDo(ProcessUnitFn(cfg, work_dir))
    )
    (keys
     | "ExactBuckets" >> beam.FlatMap(exact_buckets, NUM_BUCKETS)
     | "GroupExact" >> beam.GroupByKey()
     | "ExactDrops" >> beam.FlatMap(lambda kv: exact_drops_in_bucket(kv[1]))
     | "CollectExact" >> beam.combiners.ToList()
     | "WriteExact" >> beam.Map(write_json_to, join(work_dir, "exact_drops.json")))
    (keys
     | "BandBuckets" >> beam.FlatMap(band_buckets, NUM_BUCKETS)
     | "GroupBands" >> beam.GroupByKey()
     | "Candidates" >> beam.FlatMap(lambda kv: candidates_in_bucket(kv[1]))
     | "CollectCandidates" >> beam.combiners.ToList()
     | "WriteCandidates" >> beam.Map(write_json_to, join(work_dir, "near_candidates.json")))
    (p
     | "Files" >> beam.Create([(i, f.path) for i, f in enumerate(files)], reshuffle=False)
     | "SpreadFiles" >> beam.GroupByKey()
     | "Fingerprint" >> beam.FlatMap(lambda kv: [file_fingerprint(path) for path in kv[1]])
     | "CollectFingerprints" >> beam.combiners.ToList()
     | "WriteFingerprints" >> beam.Map(write_json_to, join(work_dir, "inputs.json")))


def _run_beam(cfg: CorpusConfig, units: list[WorkUnit], files: list[InputFile], work_dir: str) -> None:
    logging.getLogger("apache_beam").setLevel(logging.WARNING)
    with beam.Pipeline(options=beam_options(cfg.runner)) as p:
        build_graph(p, units, files, cfg, work_dir)


def _run_in_process(cfg: CorpusConfig, units: list[WorkUnit], files: list[InputFile], work_dir: str) -> None:
    """The same work as the Beam graph, one unit after another in this process, with one global bucket."""
    processor = UnitProcessor(cfg, work_dir)
    all_keys = [processor(i, unit) for i, unit in enumerate(units)]
    exact = exact_drops_in_bucket(k.exact for k in all_keys)
    near = candidates_in_bucket(k.bands for k in all_keys)
    write_json(join(work_dir, "exact_drops.json"), exact)
    write_json(join(work_dir, "near_candidates.json"), near)
    write_json(join(work_dir, "inputs.json"), [file_fingerprint(f.path) for f in files])


# ------------------------------------------------------------------------------------------------------------
# Finalization and the public entry points
# ------------------------------------------------------------------------------------------------------------
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
        return "\n".join([
            f"corpus: read {c['read']} documents from {c['files']} files ({c['input_bytes'] / 2**20:.1f} MiB)",
            f"  kept {c['kept']} ({c['sentences']} sentences), filtered {c['filtered']}"
            + (f" ({rules})" if rules else ""),
            f"  duplicates {c['duplicates']} (exact {c['exact_duplicates']}, near {c['near_duplicates']}), "
            f"quarantined {c['quarantined']}",
            f"  {c['shards']} shard(s), {c['output_text_bytes'] / 2**20:.1f} MiB of text -> {self.output_dir}",
        ])


def _gather_units(work_dir: str, n_units: int) -> tuple[Counter[str], list[dict]]:
    counts: Counter[str] = Counter()
    quarantine: list[dict] = []
    for i in range(n_units):
        side = read_json(sidecar_path(work_dir, i))
        counts.update(side["counts"])
        quarantine.extend(side["quarantine"])
    return counts, quarantine


def _signatures(work_dir: str, n_units: int, wanted: set[str]) -> dict[str, np.ndarray]:
    """MinHash signatures of the candidate documents, read back from the spill files."""
    import pyarrow as pa
    import pyarrow.compute as pc

    found: dict[str, np.ndarray] = {}
    value_set = pa.array(sorted(wanted), type=pa.string())
    for i in range(n_units):
        for batch in read_spill(spill_path(work_dir, i), columns=["doc_id", "minhash"]):
            mask = pc.is_in(batch.column(0), value_set=value_set)
            sub = batch.filter(mask)
            for doc_id, sig in zip(sub.column(0).to_pylist(), sub.column(1).to_pylist()):
                found[doc_id] = np.frombuffer(sig, dtype=np.uint32)
    return found


def _resolve_duplicates(cfg: CorpusConfig, work_dir: str, n_units: int) -> tuple[set[str], set[str]]:
    exact = set(read_json(join(work_dir, "exact_drops.json")))
    pairs = [(a, b) for a, b in read_json(join(work_dir, "near_candidates.json")) if a not in exact and b not in exact]
    near: set[str] = set()
    if pairs:
        sigs = _signatures(work_dir, n_units, {x for pair in pairs for x in pair})
        near = set(near_duplicates(pairs, sigs, cfg.dedup.threshold, doc_sort_key))
    return exact, near


def _nothing_kept(counts: Counter[str], quarantine: list[dict]) -> InputError:
    rules = sorted(((counts[f"filtered_{r}"], r) for r in RULE_NAMES if counts[f"filtered_{r}"]), reverse=True)
    parts = [f"{r}: {n}" for n, r in rules]
    hint = ""
    if rules:
        top = rules[0][1]
        hint = f"; relax corpus.filters.{top}" if top != "empty" else "; the inputs hold no text after cleaning"
    if counts["quarantined"]:
        parts.append(f"quarantined: {counts['quarantined']} (e.g. {quarantine[0]['reason']})")
    if counts["duplicates"]:
        parts.append(f"duplicates: {counts['duplicates']}")
    return InputError(f"no documents survived the corpus stage (read {counts['read']}; dropped by "
                      f"{', '.join(parts) or 'nothing'}){hint}")


def finalize(cfg: PipelineConfig, units: list[WorkUnit], files: list[InputFile], work_dir: str, out_dir: str,
             progress: bool) -> tuple[dict, Counter[str]]:
    """Resolve duplicates, write shards, quarantine and manifest; check the document-count invariant."""
    counts, quarantine = _gather_units(work_dir, len(units))
    exact, near = _resolve_duplicates(cfg.corpus, work_dir, len(units))
    counts["exact_duplicates"], counts["near_duplicates"] = len(exact), len(near)
    counts["duplicates"] = len(exact) + len(near)
    delete_matching(join(out_dir, "shards", "part-*.parquet"))
    write_quarantine(join(out_dir, "quarantine.jsonl"), quarantine)
    if counts["passed"] - counts["duplicates"] <= 0:
        raise _nothing_kept(counts, quarantine)
    shards = write_shards((spill_path(work_dir, i) for i in range(len(units))), exact | near, out_dir,
                          cfg.corpus.target_shard_bytes, progress, total=len(units))
    counts["kept"] = sum(s.rows for s in shards)
    accounted = counts["kept"] + counts["filtered"] + counts["duplicates"] + counts["quarantined"]
    if counts["read"] != accounted:
        raise RuntimeError(f"corpus invariant violated: read {counts['read']} != kept {counts['kept']} + filtered "
                           f"{counts['filtered']} + duplicates {counts['duplicates']} + quarantined "
                           f"{counts['quarantined']}")
    counts.update(files=len(files), units=len(units), shards=len(shards),
                  input_bytes=sum(f.size for f in files), output_text_bytes=sum(s.text_bytes for s in shards),
                  sentences=sum(s.sentences for s in shards))
    for name in (*BASE_COUNTS, *(f"filtered_{rule}" for rule in RULE_NAMES)):
        counts.setdefault(name, 0)  # every key always present, so metrics line up across runs
    manifest = {
        "version": 1,
        "shards": [{"name": s.name, "rows": s.rows, "bytes": s.bytes, "sha256": s.sha256} for s in shards],
        "counts": dict(sorted(counts.items())),
        "config": cfg.corpus.model_dump(mode="json"),
        "inputs": sorted(read_json(join(work_dir, "inputs.json")), key=lambda r: r["path"]),
        "schema": {"doc_id": "string", "text": "string", "sentences": "list<string>", "source": "string",
                   "metadata": "string (JSON object)"},
        "lsh": dict(zip(("bands", "rows"), lsh_params(cfg.corpus.dedup.threshold, cfg.corpus.dedup.num_perm))),
    }
    write_json_atomic(join(out_dir, "manifest.json"), manifest)
    return manifest, counts


def _prepare(cfg: PipelineConfig) -> tuple[list[InputFile], list[WorkUnit], str, str]:
    files = expand_inputs(cfg.corpus.inputs)
    units = plan_units(files, cfg.corpus)
    out_dir = cfg.stage_location("corpus")  # a URI stays a string: Path("gs://b") would be "gs:/b"
    work_dir = cfg.corpus.work_dir or join(out_dir, "_work")
    # A manifest means a complete output: a run that fails from here on must not leave the previous one behind.
    delete_matching(join(out_dir, "manifest.json"))
    delete_matching(join(work_dir, "units", "unit-*"))
    return files, units, out_dir, work_dir


def _local_or_uri(location: str) -> Path | str:
    return location if is_uri(location) else Path(location)


def _run(cfg: PipelineConfig, progress: bool, engine) -> CorpusResult:
    start = time.perf_counter()
    files, units, out_dir, work_dir = _prepare(cfg)
    log.info("corpus: %d files in %d work units -> %s", len(files), len(units), out_dir)
    engine(cfg.corpus, units, files, work_dir)
    manifest, counts = finalize(cfg, units, files, work_dir, out_dir, progress)
    if not cfg.corpus.work_dir:
        delete_tree(work_dir)
    manifest_path = join(out_dir, "manifest.json")
    result = CorpusResult(_local_or_uri(out_dir), _local_or_uri(manifest_path), manifest,
                          {k: int(v) for k, v in counts.items()}, time.perf_counter() - start,
                          hashlib.sha256(read_bytes(manifest_path)).hexdigest())
    log.info("corpus stage done in %.1f s", result.seconds)
    return result


def run_corpus(cfg: PipelineConfig, progress: bool = True) -> CorpusResult:
    """Run the corpus stage with the configured Beam runner (local multi-processing by default)."""
    validate_runner(cfg.corpus.runner)
    return _run(cfg, progress, _run_beam)


def run_plain(cfg: PipelineConfig, progress: bool = False) -> CorpusResult:
    """The same stage in one process without Beam: same functions, same output bytes (benchmark reference)."""
    return _run(cfg, progress, _run_in_process)
