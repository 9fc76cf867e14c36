"""Beam's DaskRunner with the number of bag partitions bounded after every shuffle.

Beam's Dask translation keeps a bag's partitions through a GroupByKey (`bag.groupby(key)`) and adds them up in a
Flatten (`db.concat`). A CoGroupByKey is a Flatten plus a GroupByKey, so every join of the corpus graph's
clustering rounds doubles the partition count, and dask's task shuffle grows with the square of it: on a
2.8 MB input the launcher built a task graph of over 16 GB before any work started. This runner caps both at
`--dask_npartitions` (default `DEFAULT_PARTITIONS`): a GroupByKey shuffles into at most that many partitions
and a Flatten of more is repartitioned. Everything else is Beam's own translation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
from collections.abc import Iterator

from apache_beam.runners.dask import dask_runner as beam_dask
from apache_beam.runners.dask import transform_evaluator as te
from apache_beam.runners.dask.overrides import _Flatten, _GroupByKeyOnly

DEFAULT_PARTITIONS = 16


@dataclasses.dataclass
class BoundedGroupByKey(te.GroupByKey):
    cap: int = DEFAULT_PARTITIONS

    def apply(self, input_bag, side_inputs=None):
        def key(item):
            return item[0]

        def value(item):
            k, v = item
            return k, [te.defenestrate(elm[1]) for elm in v]

        return input_bag.groupby(key, npartitions=min(input_bag.npartitions, self.cap)).map(value)


@dataclasses.dataclass
class BoundedFlatten(te.Flatten):
    cap: int = DEFAULT_PARTITIONS

    def apply(self, input_bag, side_inputs=None):
        bag = super().apply(input_bag, side_inputs)
        return bag.repartition(npartitions=self.cap) if bag.npartitions > self.cap else bag


_TRANSLATING = threading.RLock()


@contextlib.contextmanager
def bounded_translations(cap: int) -> Iterator[None]:
    """Beam's translation table with the bounded ops, for the duration of one graph translation. The table is
    process-global, so translations are serialised: two pipelines launched from threads never see each other's
    patch or restore it under each other."""
    with _TRANSLATING:
        yield from _patched(cap)


def _patched(cap: int) -> Iterator[None]:
    saved = dict(te.TRANSLATIONS)
    te.TRANSLATIONS[_GroupByKeyOnly] = functools.partial(BoundedGroupByKey, cap=cap)
    te.TRANSLATIONS[_Flatten] = functools.partial(BoundedFlatten, cap=cap)
    try:
        yield
    finally:
        te.TRANSLATIONS.clear()
        te.TRANSLATIONS.update(saved)


class DaskRunner(beam_dask.DaskRunner):
    """`--runner=bertscale.corpus.dask_runner.DaskRunner`: Beam's DaskRunner with bounded partitions."""

    def run_pipeline(self, pipeline, options):
        bag = options.view_as(beam_dask.DaskOptions).get_all_options(drop_default=True, current_only=True)
        cap = int(bag.get("npartitions") or DEFAULT_PARTITIONS)
        # The graph is translated (and submitted) inside run_pipeline; the table is restored right after.
        with bounded_translations(cap):
            return super().run_pipeline(pipeline, options)
