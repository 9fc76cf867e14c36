"""Sharded pretraining data: 64-bit offsets in the reader, random B across shards, atomic shard directories."""

from __future__ import annotations

import errno
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bertscale.data.dataset import MANIFEST, PretrainingDataset
from bertscale.data.documents import read_sentences
from bertscale.data.instances import TokenizedDocs, materialize_all
from bertscale.data.nsp_pool import PoolPart, per_shard_counts, text_windows, window
from bertscale.data.shards import BuildSettings, doc_keys, shard_instances, split_arrays
from bertscale.data.storage import read_verified, save_arrays, staged_dir, write_json
from bertscale.errors import InputError

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from factories import synthetic_docs  # noqa: E402

SPECIAL = {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}


def settings(mode: str = "nsp", **kw) -> BuildSettings:
    base = dict(tok_path="unused", special=SPECIAL, vocab_size=30000, mode=mode, seq_lengths=(64,),
                short_seq_prob=0.1, dupe_factor=1, heldout_fraction=0.0, seed=0, max_unk_fraction=0.5)
    return BuildSettings(**{**base, **kw})


# ----------------------------------------------------------------------------------------------------------------
# The reader: global index -> shard, 64-bit offsets
# ----------------------------------------------------------------------------------------------------------------
def write_fake_split(directory: Path, offsets: np.ndarray, tokens_at: dict[int, list[int]], n_tokens: int) -> None:
    """A split whose input_ids.npy is a sparse file of `n_tokens` uint16 (no data written but `tokens_at`)."""
    directory.mkdir(parents=True)
    ids = np.lib.format.open_memmap(directory / "input_ids.npy", mode="w+", dtype=np.uint16, shape=(n_tokens,))
    for pos, toks in tokens_at.items():
        ids[pos : pos + len(toks)] = toks
    ids.flush()
    del ids
    n = len(offsets) - 1
    np.save(directory / "offsets.npy", offsets.astype(np.int64))
    np.save(directory / "len_a.npy", np.full(n, 3, dtype=np.uint16))
    np.save(directory / "nsp_label.npy", np.arange(n, dtype=np.int8) % 2)


def fake_manifest(root: Path, shards: list[tuple[str, int]]) -> None:
    phase = {"shards": [{"dir": d, "instances": n, "tokens": 0, "sha256": {}} for d, n in shards],
             "instances": sum(n for _, n in shards)}
    write_json(root / MANIFEST, {"phases": {"64": {"train": phase}}, "tokenizer": {"special_ids": SPECIAL,
                                                                                 "vocab_size": 30000}})


def test_reader_indexes_past_2_to_the_31_in_instances_and_tokens(tmp_path):
    """Offsets > 2^31 in a shard, and a global instance index > 2^31: nothing is materialised (sparse file)."""
    big = 2**31
    write_fake_split(tmp_path / "s0", np.array([0, 4, 9]), {0: [2, 10, 11, 3], 4: [2, 20, 3, 21, 3]}, 9)
    # Instance 0 of the second shard is a gap never read; instances 1 and 2 lie past 2^31 tokens.
    tail = {big + 100: [2, 40, 41, 3, 42, 3], big + 106: [2, 50, 3, 51, 52, 3]}
    write_fake_split(tmp_path / "s1", np.array([0, big + 100, big + 106, big + 112]), tail, big + 112)
    assert (tmp_path / "s1" / "input_ids.npy").stat().st_blocks * 512 < 2**26, "the test file must stay sparse"
    # The manifest claims 2^31 + 2 instances in the first shard: global indices past 2^31 must still resolve.
    fake_manifest(tmp_path, [("s0", big + 2), ("s1", 3)])
    ds = PretrainingDataset(tmp_path, 64)
    assert len(ds) == big + 5
    assert ds.locate(big + 3) == (1, 1)
    x = ds[big + 3]
    assert x["input_ids"].tolist() == [2, 40, 41, 3, 42, 3]
    assert x["token_type_ids"].tolist() == [0, 0, 0, 1, 1, 1]
    assert ds[big + 4]["input_ids"].tolist() == [2, 50, 3, 51, 52, 3]
    assert ds[-1]["input_ids"].tolist() == [2, 50, 3, 51, 52, 3]
    assert ds[1]["input_ids"].tolist() == [2, 20, 3, 21, 3]


def test_reader_skips_empty_shards_and_names_a_missing_file(tmp_path):
    write_fake_split(tmp_path / "a", np.array([0, 3]), {0: [2, 7, 3]}, 3)
    write_fake_split(tmp_path / "b", np.array([0]), {}, 0)
    write_fake_split(tmp_path / "c", np.array([0, 3, 6]), {0: [2, 8, 3, 2, 9, 3]}, 6)
    fake_manifest(tmp_path, [("a", 1), ("b", 0), ("c", 2)])
    ds = PretrainingDataset(tmp_path, 64)
    assert [int(ds[i]["input_ids"][1]) for i in range(3)] == [7, 8, 9]
    assert ds.lengths.tolist() == [3, 3, 3]
    (tmp_path / "c" / "len_a.npy").unlink()
    with pytest.raises(InputError, match=r"c/len_a.npy is missing.*rebuild"):
        PretrainingDataset(tmp_path, 64)


def test_split_arrays_have_64_bit_offsets_and_match_the_instances():
    docs = synthetic_docs(30, seed=4)
    rng = np.random.default_rng(0)
    pool = PoolPart(synthetic_docs(8, seed=5), doc_keys(9, np.arange(8)))
    d, inst, _ = shard_instances(docs, doc_keys(0, np.arange(30)), pool, settings(), 64, rng)
    arrays, counts = split_arrays(d, inst, 64, settings())
    assert arrays["offsets"].dtype == np.int64 and arrays["input_ids"].dtype == np.uint16
    assert counts["instances"] == len(inst) and counts["tokens"] == int(arrays["offsets"][-1])
    tokens, offsets, len_a = materialize_all(d, inst, 2, 3)
    assert np.array_equal(arrays["offsets"], offsets) and np.array_equal(arrays["len_a"], len_a)


# ----------------------------------------------------------------------------------------------------------------
# Random B from the pool: another document, about half the time
# ----------------------------------------------------------------------------------------------------------------
def test_random_b_comes_from_the_pool_never_from_a_own_document():
    """The pool holds copies of some of the shard's own documents (sampled from every shard, this one included):
    B may come from any pool document but the copy of A's own."""
    docs = synthetic_docs(60, seed=1)
    keys = doc_keys(2, np.arange(60))
    # Pool: 10 documents of this shard (copies, same keys) and 10 of another shard.
    own = np.arange(0, 60, 6)
    other = synthetic_docs(10, seed=2)
    pool_docs = TokenizedDocs(*_concat(docs.select(own), other))
    pool_keys = np.concatenate([keys[own], doc_keys(7, np.arange(10))])
    order = np.argsort(pool_keys)
    pool = PoolPart(pool_docs.select(order), pool_keys[order])
    d, inst, _ = shard_instances(docs, keys, pool, settings(), 128, np.random.default_rng(3))
    rand = inst.nsp_label == 1
    assert 0.45 < rand.mean() < 0.55, rand.mean()
    assert (inst.doc_a < 60).all() and (inst.doc_b[rand] >= 60).all()
    b_keys = pool.keys[inst.doc_b[rand] - 60]
    assert not (b_keys == keys[inst.doc_a[rand]]).any()
    # And by content: B's tokens never occur in A's document (token ids encode their document).
    src_tokens = [set(docs.tokens[docs.sent_offsets[docs.doc_offsets[i]]:
                                  docs.sent_offsets[docs.doc_offsets[i + 1]]].tolist()) for i in range(60)]
    for i in np.flatnonzero(rand):
        assert not set(d.tokens[inst.b_start[i] : inst.b_end[i]].tolist()) & src_tokens[inst.doc_a[i]]
    assert (b_keys >> 32 == 2).any(), "copies of the shard's own other documents are valid Bs too"


def _concat(a: TokenizedDocs, b: TokenizedDocs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from bertscale.data.instances import concat_docs

    c = concat_docs([a, b])
    return c.tokens, c.sent_offsets, c.doc_offsets


def test_a_pool_holding_only_a_own_document_is_a_clear_error():
    docs = synthetic_docs(1, seed=1, max_sents=4)
    keys = doc_keys(0, np.arange(1))
    with pytest.raises(InputError, match="too few usable documents for NSP"):
        shard_instances(docs, keys, PoolPart(docs, keys), settings(), 64, np.random.default_rng(0))


def test_pool_windows_are_bounded_whole_sentences():
    docs = synthetic_docs(40, seed=6, max_sents=30, max_len=30)
    w = window(docs, 64, np.random.default_rng(0))
    assert w.num_docs == docs.num_docs
    lengths = np.diff(w.sent_offsets[w.doc_offsets])
    longest = np.diff(docs.sent_offsets).max()
    assert (lengths <= 64 + longest).all() and (lengths > 0).all()
    assert set(w.tokens.tolist()) <= set(docs.tokens.tolist())
    assert per_shard_counts(10, 4) == [3, 3, 2, 2] and sum(per_shard_counts(7, 9)) == 7


def test_text_windows_are_runs_of_whole_sentences_and_short_documents_stay_whole():
    docs = [[f"doc {d} sentence {i} " + "x" * (i % 7) for i in range(n)] for d, n in enumerate([3, 80, 0, 200])]
    col = pa.array(docs, pa.large_list(pa.large_string()))
    out = text_windows(col, 200, np.random.default_rng(0)).to_pylist()
    assert out[0] == docs[0] and out[2] == []
    for d in (1, 3):
        w = out[d]
        start = docs[d].index(w[0])
        assert w == docs[d][start : start + len(w)]
        assert 200 <= sum(map(len, w)) <= 200 + max(map(len, docs[d])) or start + len(w) == len(docs[d])
    starts = {docs[3].index(text_windows(col, 200, np.random.default_rng(k)).to_pylist()[3][0]) for k in range(8)}
    assert len(starts) > 1, "the window starts at a random sentence"


# ----------------------------------------------------------------------------------------------------------------
# Atomic directories and readable errors
# ----------------------------------------------------------------------------------------------------------------
def test_a_staged_directory_is_complete_or_absent(tmp_path):
    final = tmp_path / "00001"
    with pytest.raises(RuntimeError):
        with staged_dir(final) as tmp:
            save_arrays(tmp, {"x": np.arange(3)}, tmp)
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    with staged_dir(final) as tmp:
        files = save_arrays(tmp / "seq64", {"x": np.arange(3)}, tmp)
        write_json(tmp / "shard.json", {"key": "k1", "files": files})
    assert read_verified(final, "shard.json", "k1")["files"] == {"seq64/x.npy": files["seq64/x.npy"]}
    assert read_verified(final, "shard.json", "k2") is None  # other inputs
    np.save(final / "seq64" / "x.npy", np.arange(4))  # damaged after the fact
    assert read_verified(final, "shard.json", "k1") is None


def test_disk_full_is_one_line_naming_the_path_and_nothing_is_marked_complete(tmp_path, monkeypatch):
    def full(path, arr):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(np, "save", full)
    final = tmp_path / "00000"
    with pytest.raises(InputError, match=r"cannot write .*x\.npy: No space left on device; free disk space") as e:
        with staged_dir(final) as tmp:
            save_arrays(tmp, {"x": np.arange(3)}, tmp)
    assert "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_an_unreadable_corpus_shard_is_named(tmp_path):
    path = tmp_path / "part-00003.parquet"
    table = pa.table({"sentences": [[f"sentence {i} of a document."] * 5 for i in range(2000)]})
    pq.write_table(table, path, compression="none")
    raw = bytearray(path.read_bytes())
    raw[8:4000] = b"\xff" * 3992  # the first data page is garbage, the footer intact
    path.write_bytes(bytes(raw))
    with pytest.raises(InputError, match=r"cannot read corpus shard .*part-00003\.parquet"):
        list(read_sentences(path))

