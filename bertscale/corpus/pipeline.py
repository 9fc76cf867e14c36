"""The corpus stage as one Beam graph, and `run_corpus` / `run_plain` that launch it.

Everything that touches text runs in transforms; only small aggregates reach the launcher (`summary.json`: counts,
shard names, sizes and checksums, input fingerprints), from which it writes `manifest.json`. Shape of the graph
(document text never crosses a shuffle; documents travel as int references `unit << 32 | row`, see `units.py`):

    units -GBK-> Process: read, clean, filter, decontaminate, MinHash, split; per unit a spill parquet and two
                 key files sorted by bucket; (key file spans, counts, quarantine, decontamination report)
      exact key spans -GBK(bucket)-> read spans -> exact drops -----------+
      band key spans  -GBK(bucket)-> read spans -> candidate pairs        |
                 -GBK(unit pair)-> verify (signatures read from the two   |
                 spills) -> edges -CoGBK(unit)x2-> minus exact drops ->   |
                 connected components -> near drops -------------------- +-> drops per unit -> kept rows + sizes
      kept sizes -> prefix offsets (joined per unit) -> shard slot per doc -CoGBK(slot, rank)-> WriteShard
      counts, drops, shard infos, fingerprints -GBK(one key)-> summary.json; quarantine -GBK-> quarantine.jsonl;
      decontamination report -GBK-> decontamination.jsonl

Near-duplicate clusters are connected components of the verified candidate graph, found by min-label
propagation: every node starts with the smallest id among itself and its neighbours, and each round (one
CoGroupByKey + CombinePerKey(min)) spreads labels one hop. LSH candidates of a band are all pairs (or a star
on the smallest member for big bands), so near-duplicate clusters have a diameter of one or two and converge in
a round or two; a graph's rounds must be fixed when it is built, so `dedup.cluster_rounds` rounds are unrolled
and then checked: labels that still meet across an edge are merged by one union-find over those label pairs
(in a worker; with converged rounds it is empty) and the count is reported as `near_dedup.unconverged_edges`.
This uses only GroupByKey/CoGroupByKey/CombinePerKey (no state, timers or metrics), so it runs on any runner
including Dask, and the result is exact whatever the number of rounds. Side inputs are avoided altogether: Beam's
DaskRunner evaluates a side input by recomputing its whole lineage inside the consuming task, which here would
re-run the corpus processing; small joins on a key do the same work once. Each cluster keeps its
smallest reference: the first copy in document order. For the same reason the decontamination index (the eval
sets' n-grams, `decontaminate.py`) is built by the launcher and read by the workers from the work directory.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from bertscale.config import CorpusConfig, PipelineConfig, is_uri
from bertscale.corpus.decontaminate import build_index, index_dir, is_active
from bertscale.corpus.dedup import (
    candidates_in_bucket,
    estimated_jaccard,
    exact_drops_in_bucket,
    initial_label,
    label_conflicts,
    merge_labels,
    spread_label,
)
from bertscale.corpus.manifest import CorpusResult, build_manifest
from bertscale.corpus.output import (
    SHARD_SCHEMA,
    assign_shards,
    delete_matching,
    delete_tree,
    file_fingerprint,
    join,
    open_for_read,
    read_bytes,
    read_json,
    read_spill,
    read_spill_rows,
    write_json,
    write_json_atomic,
    write_decontamination_report,
    write_quarantine,
    write_shard,
)
from bertscale.corpus.readers import InputFile, WorkUnit, expand_inputs, plan_units
from bertscale.corpus.runners import (
    beam_options,
    check_pipeline_options,
    check_runner_name,
    is_remote,
    ship_code,
    validate_runner,
)
from bertscale.corpus.units import UnitProcessor, UnitResult, read_keys, ref_row, ref_unit, spill_path
from bertscale.errors import BertscaleError
from bertscale.progress import logs_above, progress_bar

__all__ = ["CorpusResult", "build_graph", "check_pipeline_options", "check_runner_name", "dedup_buckets",
           "run_corpus", "run_plain", "validate_runner"]
log = logging.getLogger(__name__)
_ONE = 0  # the key of the single group that gathers small aggregates


@dataclass(frozen=True)
class StagePlan:
    """Everything the graph needs, fixed before it is built."""

    units: list[WorkUnit]
    files: list[InputFile]
    work_dir: str
    out_dir: str
    buckets: int
    decontamination: dict | None = None  # the eval index's size and what was read from each eval file


def dedup_buckets(input_bytes: int) -> int:
    """Shuffle buckets for dedup keys: one per 32 MB of input (a power of two, 32 to 8192). Each unit sends one
    batch per bucket, so buckets grow with the input to spread the groups over workers, but not so fast that
    batches shrink to a handful of keys (Beam's per-element cost is ~35 us)."""
    wanted = max(1, input_bytes // (32 * 2**20))
    return int(min(8192, max(32, 2 ** math.ceil(math.log2(wanted)))))


# ------------------------------------------------------------------------------------------------------------
# DoFns and small steps
# ------------------------------------------------------------------------------------------------------------
class ProcessUnitFn(beam.DoFn):
    """`UnitProcessor` as a DoFn: built once per worker (MinHash permutations, rules), fed (key, [unit])."""

    def __init__(self, cfg: CorpusConfig, work_dir: str, buckets: int) -> None:
        self.cfg, self.work_dir, self.buckets = cfg, work_dir, buckets
        self.processor: UnitProcessor | None = None

    def setup(self) -> None:
        self.processor = UnitProcessor(self.cfg, self.work_dir, self.buckets)

    def process(self, element: tuple[int, Iterable[WorkUnit]]) -> Iterator[UnitResult]:
        index, units = element
        for unit in units:
            yield self.processor(index, unit)


def key_spans(result: UnitResult, kind: str) -> Iterator[tuple[int, tuple[int, int, int]]]:
    """(bucket, (unit, start, end)) for each non-empty bucket of a unit's key file of `kind`."""
    for bucket, start, end in getattr(result, kind):
        yield bucket, (result.index, start, end)


def rows_by_unit(refs: Iterable[int]) -> Iterator[tuple[int, list[int]]]:
    """References batched as (unit, [rows]): one element per unit instead of one per document."""
    parts: dict[int, list[int]] = {}
    for ref in refs:
        parts.setdefault(ref_unit(ref), []).append(ref_row(ref))
    yield from parts.items()


_ROWS = np.int64(0xFFFFFFFF)
_VERIFY_CHUNK = 1 << 16  # candidate pairs compared at once: bounds the (pairs x num_perm) comparison


def pairs_by_units(pairs: list[tuple[int, int]]) -> Iterator[tuple[tuple[int, int], bytes]]:
    """Candidate pairs keyed by the units of their two documents, packed: the verifier of a unit pair then
    reads the signatures of just two spill files, and no signature ever crosses a shuffle."""
    if not pairs:
        return
    arr = np.asarray(pairs, dtype=np.int64)
    units = arr >> 32
    order = np.lexsort((units[:, 1], units[:, 0]))
    arr, units = arr[order], units[order]
    change = np.flatnonzero(np.r_[True, (units[1:] != units[:-1]).any(axis=1)])
    for start, end in zip(change.tolist(), [*change[1:].tolist(), len(arr)]):
        yield (int(units[start, 0]), int(units[start, 1])), arr[start:end].tobytes()


def unit_signatures(work_dir: str, unit: int, rows: np.ndarray) -> np.ndarray:
    """MinHash signatures (len(rows) x num_perm, uint32) of the given ascending rows of a unit's spill file,
    read a row group at a time."""
    values = [v for chunk in read_spill_rows(spill_path(work_dir, unit), rows, ["minhash"])
              for v in chunk.column(0).to_pylist()]
    return np.frombuffer(b"".join(values), dtype=np.uint32).reshape(len(rows), -1)


def verify_unit_pair(element: tuple[tuple[int, int], Iterable[bytes]], work_dir: str,
                     threshold: float) -> Iterator[tuple[int, int]]:
    """Verified edges (a, b) among the candidate pairs of one unit pair: estimated Jaccard >= threshold."""
    (unit_a, unit_b), batches = element
    pairs = np.unique(np.concatenate([np.frombuffer(b, dtype=np.int64).reshape(-1, 2) for b in batches]), axis=0)
    rows_a, rows_b = np.unique(pairs[:, 0] & _ROWS), np.unique(pairs[:, 1] & _ROWS)
    sig_a = unit_signatures(work_dir, unit_a, rows_a)
    sig_b = sig_a if unit_b == unit_a and np.array_equal(rows_a, rows_b) else unit_signatures(work_dir, unit_b, rows_b)
    for start in range(0, len(pairs), _VERIFY_CHUNK):
        chunk = pairs[start:start + _VERIFY_CHUNK]
        similarity = estimated_jaccard(sig_a[np.searchsorted(rows_a, chunk[:, 0] & _ROWS)],
                                       sig_b[np.searchsorted(rows_b, chunk[:, 1] & _ROWS)])
        for a, b in chunk[similarity >= threshold].tolist():
            yield a, b


def without_exact_drops(element: tuple[int, dict], side: int) -> Iterator[tuple[int, tuple[int, int]]]:
    """The edges of one unit (joined on the unit of their end `side`) whose end is not an exact duplicate:
    near-duplicate clustering only sees documents that survived exact dedup. Re-keyed by the other end's unit."""
    unit, parts = element
    dropped = {row for batch in parts["exact"] for row in batch}
    for edge in parts["edge"]:
        if ref_row(edge[side]) not in dropped:
            yield ref_unit(edge[1 - side]), edge


def _spread(element: tuple[int, dict]) -> Iterator[tuple[int, int]]:
    node, parts = element
    yield from spread_label(node, parts["adj"][0], parts["label"][0])


def _offer(element: tuple[int, dict]) -> Iterator[tuple[int, tuple[bool, int]]]:
    node, parts = element
    label = parts["label"][0]
    yield node, (True, label)
    for other in parts["adj"][0]:
        yield other, (False, label)


def _conflicts(element: tuple[int, Iterable[tuple[bool, int]]]) -> Iterator[tuple[int, int]]:
    offers = list(element[1])
    own = next(label for is_own, label in offers if is_own)
    yield from label_conflicts(own, (label for is_own, label in offers if not is_own))


def _relabel(element: tuple[int, dict]) -> Iterator[tuple[int, int]]:
    label, parts = element
    final = parts["merged"][0] if parts["merged"] else label
    for node in parts["node"]:
        yield node, final


def kept_rows(element: tuple[int, dict], work_dir: str) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(unit, kept rows, their text bytes): the unit's spill rows minus its drops (reads one int column)."""
    unit, parts = element
    sizes = read_spill(spill_path(work_dir, unit), ["text_bytes"]).column(0).to_numpy()
    keep = np.ones(len(sizes), dtype=bool)
    for batch in parts["drops"]:
        keep[np.asarray(batch, dtype=np.int64)] = False
    rows = np.flatnonzero(keep)
    yield unit, rows, sizes[rows]


def prefix_offsets(element: tuple[int, Iterable[tuple[int, int]]]) -> Iterator[tuple[int, int]]:
    """(unit, kept text bytes of all earlier units) from every unit's (unit, kept text bytes)."""
    total = 0
    for unit, size in sorted(element[1]):
        yield unit, total
        total += size


def place_rows(element: tuple[int, dict], target: int) -> Iterator[tuple[int, tuple[int, list[int]]]]:
    """(shard slot, (unit, rows)) for a unit's kept rows, joined with the unit's offset in the kept text."""
    unit, parts = element
    (rows, sizes), (offset,) = parts["kept"][0], parts["offset"]
    for slot, positions in assign_shards(offset, sizes, target):
        yield slot, (unit, rows[positions].tolist())


def slot_ranks(element: tuple[int, Iterable[int]]) -> Iterator[tuple[int, int]]:
    """(slot, shard number): slots of documents bigger than a shard stay empty, and shard names count only the
    non-empty ones, so they have no gaps."""
    for rank, slot in enumerate(sorted(set(element[1]))):
        yield slot, rank


class WriteShardFn(beam.DoFn):
    """Gathers one shard's rows from the spill files of its (few) units, in order, and writes the shard."""

    def __init__(self, work_dir: str, out_dir: str) -> None:
        self.work_dir, self.out_dir = work_dir, out_dir

    def process(self, element: tuple[int, dict]) -> Iterator[tuple]:
        _, parts = element
        chunks = (chunk for unit, rows in sorted(parts["rows"])
                  for chunk in read_spill_rows(spill_path(self.work_dir, unit), np.asarray(rows), SHARD_SCHEMA.names))
        info = write_shard(self.out_dir, parts["rank"][0], chunks)
        yield "shard", info.__dict__


def write_summary(element: tuple[int, Iterable[tuple[str, object]]], path: str) -> str:
    """The launcher's only view of the run: summed counts, shard infos, input fingerprints, cluster checks."""
    counts: dict[str, int] = {}
    shards, inputs, plan = [], [], {}
    for kind, value in element[1]:
        if kind == "counts":
            for name, n in value.items():
                counts[name] = counts.get(name, 0) + n
        elif kind == "shard":
            shards.append(value)
        elif kind == "input":
            inputs.append(value)
        elif kind == "plan":
            plan = value
        else:
            counts[kind] = counts.get(kind, 0) + value
    write_json(path, {"counts": counts, "shards": sorted(shards, key=lambda s: s["name"]),
                      "inputs": sorted(inputs, key=lambda r: r["path"]), "plan": plan})
    return path


def _write_quarantine(element: tuple[int, Iterable[list[dict]]], path: str) -> str:
    write_quarantine(path, [record for batch in element[1] for record in batch])
    return path


def _write_report(element: tuple[int, Iterable[list[dict]]], path: str) -> str:
    write_decontamination_report(path, [record for batch in element[1] for record in batch])
    return path


# ------------------------------------------------------------------------------------------------------------
# The graph
# ------------------------------------------------------------------------------------------------------------
def gather(pcoll, label: str):
    """All elements of a (small) PCollection in one group, keyed by a constant."""
    return pcoll | f"{label}Key" >> beam.Map(lambda x: (_ONE, x)) | f"{label}Group" >> beam.GroupByKey()


def connected_components(edges, rounds: int):
    """(node, label) for every node of the edge list, label = the component's smallest node; and the count of
    label conflicts left after `rounds` propagation rounds (0 = converged), as ("unconverged_edges", n) records."""
    adjacency = (edges
                 | "BothWays" >> beam.FlatMap(lambda e: (e, (e[1], e[0])))
                 | "Adjacency" >> beam.GroupByKey()
                 | "Neighbors" >> beam.MapTuple(lambda node, others: (node, sorted(set(others)))))
    labels = adjacency | "InitLabels" >> beam.MapTuple(lambda node, others: (node, initial_label(node, others)))
    for r in range(rounds):
        labels = ({"adj": adjacency, "label": labels}
                  | f"JoinLabels{r}" >> beam.CoGroupByKey()
                  | f"Spread{r}" >> beam.FlatMap(_spread)
                  | f"MinLabel{r}" >> beam.CombinePerKey(min))
    conflicts = ({"adj": adjacency, "label": labels}
                 | "JoinCheck" >> beam.CoGroupByKey()
                 | "Offer" >> beam.FlatMap(_offer)
                 | "GroupOffers" >> beam.GroupByKey()
                 | "Conflicts" >> beam.FlatMap(_conflicts))
    residue = gather(conflicts, "Residue")
    merged = residue | "MergeLabels" >> beam.FlatMap(lambda kv: merge_labels(kv[1]).items())
    unconverged = residue | "CountResidue" >> beam.Map(lambda kv: ("unconverged_edges", len(list(kv[1]))))
    final = ({"node": labels | "ByLabel" >> beam.MapTuple(lambda node, label: (label, node)), "merged": merged}
             | "JoinMerged" >> beam.CoGroupByKey()
             | "FinalLabels" >> beam.FlatMap(_relabel))
    return final, unconverged


def near_drops(results, exact_batches, cfg: CorpusConfig, plan: StagePlan):
    """References of near duplicates (every member of a verified cluster but its smallest), and cluster checks."""
    candidates = (results
                  | "BandBuckets" >> beam.FlatMap(key_spans, "bands")
                  | "GroupBands" >> beam.GroupByKey()
                  | "Candidates" >> beam.FlatMap(
                      lambda kv: pairs_by_units(candidates_in_bucket(read_keys(plan.work_dir, "bands", kv[1])))))
    edges = (candidates
             | "GroupUnitPairs" >> beam.GroupByKey()
             | "Verify" >> beam.FlatMap(verify_unit_pair, plan.work_dir, cfg.dedup.threshold)
             | "ByFirstUnit" >> beam.Map(lambda e: (ref_unit(e[0]), e)))
    edges = ({"edge": edges, "exact": exact_batches}
             | "JoinFirst" >> beam.CoGroupByKey()
             | "FirstSurvives" >> beam.FlatMap(without_exact_drops, 0))
    edges = ({"edge": edges, "exact": exact_batches}
             | "JoinSecond" >> beam.CoGroupByKey()
             | "SecondSurvives" >> beam.FlatMap(without_exact_drops, 1)
             | "Edges" >> beam.Values())
    labels, unconverged = connected_components(edges, cfg.dedup.cluster_rounds)
    drops = labels | "NearDrops" >> beam.FlatMapTuple(lambda node, label: [node] if node != label else [])
    return drops, unconverged


def write_shards(results, drop_batches, plan: StagePlan, target: int):
    """Shard infos: drops applied per unit, each kept document placed by its offset in the kept text."""
    unit_rows = results | "UnitRows" >> beam.Map(lambda r: (r.index, r.rows))
    kept = ({"drops": drop_batches, "rows": unit_rows}
            | "JoinDrops" >> beam.CoGroupByKey()
            | "KeptRows" >> beam.FlatMap(kept_rows, plan.work_dir))
    offsets = (gather(kept | "KeptBytes" >> beam.MapTuple(lambda unit, rows, sizes: (unit, int(sizes.sum()))),
                      "Offsets")
               | "PrefixSums" >> beam.FlatMap(prefix_offsets))
    placed = ({"kept": kept | "KeyKept" >> beam.MapTuple(lambda unit, rows, sizes: (unit, (rows, sizes))),
               "offset": offsets}
              | "JoinOffsets" >> beam.CoGroupByKey()
              | "Place" >> beam.FlatMap(place_rows, target))
    slots = placed | "Slot" >> beam.MapTuple(lambda slot, _: slot)
    ranks = gather(slots, "Slots") | "Rank" >> beam.FlatMap(slot_ranks)
    return ({"rows": placed, "rank": ranks}
            | "GroupShard" >> beam.CoGroupByKey()
            | "WriteShard" >> beam.ParDo(WriteShardFn(plan.work_dir, plan.out_dir)))


def build_graph(p, plan: StagePlan, cfg: CorpusConfig) -> None:
    """Add the corpus stage to pipeline `p`: shards and quarantine under `out_dir`, `summary.json` in work_dir."""
    # Biggest units first: the runner deals grouped keys round-robin to workers, which then balances well.
    order = sorted(range(len(plan.units)), key=lambda i: (-_unit_size(plan.units[i]), i))
    results = (p
               | "Units" >> beam.Create([(i, plan.units[i]) for i in order], reshuffle=False)
               | "SpreadUnits" >> beam.GroupByKey()
               | "Process" >> beam.ParDo(ProcessUnitFn(cfg, plan.work_dir, plan.buckets)))
    exact_batches = (results
                     | "ExactBuckets" >> beam.FlatMap(key_spans, "exact")
                     | "GroupExact" >> beam.GroupByKey()
                     | "ExactDrops" >> beam.FlatMap(
                         lambda kv: rows_by_unit(exact_drops_in_bucket(read_keys(plan.work_dir, "exact", kv[1])))))
    near, unconverged = near_drops(results, exact_batches, cfg, plan)
    near_batches = near | "NearByUnit" >> beam.Map(lambda ref: (ref_unit(ref), [ref_row(ref)]))
    drops = (exact_batches, near_batches) | "AllDrops" >> beam.Flatten()
    shards = write_shards(results, drops, plan, cfg.target_shard_bytes)
    fingerprints = (p
                    | "Files" >> beam.Create([(i, f.path) for i, f in enumerate(plan.files)], reshuffle=False)
                    | "SpreadFiles" >> beam.GroupByKey()
                    | "Fingerprint" >> beam.FlatMap(lambda kv: [("input", file_fingerprint(x)) for x in kv[1]]))
    records = (
        p | "Plan" >> beam.Create([("plan", {"units": len(plan.units), "buckets": plan.buckets})]),
        results | "UnitCounts" >> beam.Map(lambda r: ("counts", r.counts)),
        # Counts are summed per key before the one-key gather: a record per duplicate (or per bucket and unit)
        # would not stay small at scale.
        exact_batches | "ExactCount" >> beam.Map(lambda kv: ("exact_duplicates", len(kv[1])))
        | "SumExact" >> beam.CombinePerKey(sum),
        near | "NearCount" >> beam.Map(lambda _: ("near_duplicates", 1)) | "SumNear" >> beam.CombinePerKey(sum),
        unconverged, shards, fingerprints,
    ) | "Records" >> beam.Flatten()
    summary = gather(records, "Summary") | "WriteSummary" >> beam.Map(write_summary,
                                                                      join(plan.work_dir, "summary.json"))
    quarantine = (p | "NoQuarantine" >> beam.Create([[]]),
                  results | "Quarantine" >> beam.Map(lambda r: r.quarantine)) | "AllQuarantine" >> beam.Flatten()
    quarantined = (gather(quarantine, "Quarantine")
                   | "WriteQuarantine" >> beam.Map(_write_quarantine, join(plan.out_dir, "quarantine.jsonl")))
    report = (p | "NoReport" >> beam.Create([[]]),
              results | "UnitReport" >> beam.Map(lambda r: r.decontaminated)) | "AllReport" >> beam.Flatten()
    reported = (gather(report, "Report")
                | "WriteReport" >> beam.Map(_write_report, join(plan.out_dir, "decontamination.jsonl")))
    # One last transform downstream of every output: Beam's DaskRunner computes only the last transform's
    # lineage, so a second sink left dangling would silently never run there.
    (summary, quarantined, reported) | "Outputs" >> beam.Flatten() | "Done" >> beam.Map(lambda _: None)


def _unit_size(unit: WorkUnit) -> int:
    return unit.file.size if unit.end is None else unit.end - unit.start


# ------------------------------------------------------------------------------------------------------------
# Launching
# ------------------------------------------------------------------------------------------------------------
def _run_beam(cfg: CorpusConfig, plan: StagePlan) -> None:
    logging.getLogger("apache_beam").setLevel(logging.WARNING)
    ship_code(cfg.runner)
    try:
        with beam.Pipeline(options=beam_options(cfg.runner)) as p:
            build_graph(p, plan, cfg)
    except Exception as e:
        if not is_remote(cfg.runner) or isinstance(e, BertscaleError):
            raise
        # A lost worker or cluster is not a bug here: one line, and the manifest (written after) never is.
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise BertscaleError(f"the {cfg.runner.runner} run failed ({type(e).__name__}: {first}); nothing was "
                             f"marked complete in {plan.out_dir}: re-run the stage") from e


def _run_in_process(cfg: CorpusConfig, plan: StagePlan) -> None:
    """The same graph on Beam's in-process runner: one process, one bundle at a time (the reference twin)."""
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    logging.getLogger("apache_beam").setLevel(logging.WARNING)
    with beam.Pipeline(runner=FnApiRunner()) as p:
        build_graph(p, plan, cfg)


def _prepare(cfg: PipelineConfig) -> StagePlan:
    files = expand_inputs(cfg.corpus.inputs)
    units = plan_units(files, cfg.corpus)
    out_dir = cfg.stage_location("corpus")  # a URI stays a string: Path("gs://b") would be "gs:/b"
    work_dir = cfg.corpus.work_dir or join(out_dir, "_work")
    decontamination = _prepare_decontamination(cfg.corpus, work_dir)  # a bad eval file stops the run here
    # A manifest means a complete output: a run that fails from here on must not leave the previous one behind.
    delete_matching(join(out_dir, "manifest.json"))
    delete_matching(join(out_dir, "shards", "part-*.parquet"))
    delete_matching(join(work_dir, "units", "unit-*"))
    delete_matching(join(work_dir, "summary.json"))
    return StagePlan(units, files, work_dir, out_dir, dedup_buckets(sum(f.size for f in files)), decontamination)


def _prepare_decontamination(cfg: CorpusConfig, work_dir: str) -> dict | None:
    """Build the eval n-gram index and write it where the workers read it; what it holds, for the manifest."""
    if not is_active(cfg.decontamination):
        return None
    start = time.perf_counter()
    index, stats = build_index(cfg.decontamination)
    index.save(index_dir(work_dir))
    log.info("corpus: decontamination index of %s %d-grams from %d eval file(s) in %.1f s", f"{len(index):,}",
             index.ngram, len(stats), time.perf_counter() - start)
    return {"index_ngrams": len(index), "eval_files": [s.as_dict() for s in stats]}


# ------------------------------------------------------------------------------------------------------------
# Progress
# ------------------------------------------------------------------------------------------------------------
class UnitProgress:
    """The launcher's view of a running graph: work units processed, documents that passed the filters, shards
    written, as a progress bar (`bertscale.progress`) fed by a thread that polls the work and output directories.

    A unit writes its key files last, after closing its spill file: a unit is done once its `.exact` key file
    exists, and its spill file's parquet footer then holds the number of documents it kept. Any runner's workers
    write where the launcher can read (a local or shared disk, gs://), whereas Beam's local runner reports
    metrics only once the pipeline has finished and the DaskRunner reports none. Nothing polls when the bar is
    not drawn.
    """

    LOCAL_POLL_S = 2.0
    REMOTE_POLL_S = 30.0  # listing an object store costs requests

    def __init__(self, plan: StagePlan, poll_s: float | None = None) -> None:
        self.plan = plan
        self.poll_s = poll_s if poll_s is not None else (
            self.REMOTE_POLL_S if is_uri(plan.work_dir) else self.LOCAL_POLL_S)
        self.bar = progress_bar(len(plan.units), "corpus: units", "unit")
        self.done: set[int] = set()
        self.documents = self.shards = 0
        self._start = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> UnitProgress:
        if not self.bar.disable:
            self._thread = threading.Thread(target=self._watch, name="corpus-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            if kind is None:
                self._guarded_poll()  # the final counts, whatever the polling interval
        self.bar.close()

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            self._guarded_poll()

    def _guarded_poll(self) -> None:
        try:
            self.poll()
        except Exception:  # noqa: BLE001 - a progress report must never fail the stage
            log.debug("corpus: progress poll failed", exc_info=True)

    def poll(self) -> None:
        """Count the units finished and shards written since the last poll, and update the bar."""
        new = 0
        for path in _matching(join(self.plan.work_dir, "units", "unit-*.exact")):
            index = int(path.rsplit("unit-", 1)[1].split(".", 1)[0])
            if index in self.done or index >= len(self.plan.units):
                continue
            try:
                with open_for_read(spill_path(self.plan.work_dir, index)) as fh:
                    rows = pq.ParquetFile(fh).metadata.num_rows
            except (OSError, pa.ArrowException):
                continue  # a retried bundle is rewriting it: counted at a later poll
            self.done.add(index)
            self.documents += rows
            new += 1
        self.shards = len(_matching(join(self.plan.out_dir, "shards", "part-*.parquet")))
        self.bar.set_postfix(passed=f"{self.documents:,}", shards=self.shards, refresh=False)
        self.bar.update(new)
        if new and len(self.done) == len(self.plan.units):
            log.info("corpus: all %d units processed in %.0f s, %s documents passed the filters; deduplicating "
                     "and writing shards", len(self.done), time.monotonic() - self._start, f"{self.documents:,}")


def _matching(pattern: str) -> list[str]:
    return [m.path for m in FileSystems.match([pattern])[0].metadata_list]


def _local_or_uri(location: str) -> Path | str:
    return location if is_uri(location) else Path(location)


def _run(cfg: PipelineConfig, engine) -> CorpusResult:
    start = time.perf_counter()
    plan = _prepare(cfg)
    log.info("corpus: %d files in %d work units, %d dedup buckets -> %s", len(plan.files), len(plan.units),
             plan.buckets, plan.out_dir)
    with UnitProgress(plan) as progress, logs_above(progress.bar):
        engine(cfg.corpus, plan)
    summary = read_json(join(plan.work_dir, "summary.json"))
    manifest, counts = build_manifest(cfg.corpus, summary, plan.out_dir, len(plan.files),
                                      sum(f.size for f in plan.files), plan.decontamination)
    write_json_atomic(join(plan.out_dir, "manifest.json"), manifest)
    if not cfg.corpus.work_dir:
        delete_tree(plan.work_dir)
    manifest_path = join(plan.out_dir, "manifest.json")
    result = CorpusResult(_local_or_uri(plan.out_dir), _local_or_uri(manifest_path), manifest, counts,
                          time.perf_counter() - start, hashlib.sha256(read_bytes(manifest_path)).hexdigest())
    log.info("corpus stage done in %.1f s", result.seconds)
    return result


def run_corpus(cfg: PipelineConfig) -> CorpusResult:
    """Run the corpus stage with the configured Beam runner (local multi-processing by default)."""
    validate_runner(cfg.corpus.runner)
    return _run(cfg, _run_beam)


def run_plain(cfg: PipelineConfig) -> CorpusResult:
    """The same graph on Beam's in-process runner, in this process: the twin that tests compare runners against."""
    return _run(cfg, _run_in_process)
