"""The pretraining-data stage on real text: corpus shards -> tokenized shards -> memory-mapped instance shards."""

from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, trainers
from tokenizers.models import WordPiece

from bertscale.config import PipelineConfig
from bertscale.data import DistributedLoader, MLMCollator, PretrainingDataset, build_pretraining_data
from bertscale.data.documents import heldout_rows
from bertscale.data.storage import file_sha256
from bertscale.errors import ConfigError, InputError

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = Path(os.environ.get("BERTSCALE_SHARED_DATA", REPO.parent / "shared" / "data"))
SAMPLE = REPO / "data" / "sample" / "gutenberg"
SCHEMA = pa.schema([("doc_id", pa.string()), ("text", pa.string()), ("sentences", pa.list_(pa.string())),
                    ("source", pa.string()), ("metadata", pa.string())])
SENTENCE_END = re.compile(r"(?<=[.!?;])\s+")


def paragraphs(path: Path, min_chars: int = 150) -> list[str]:
    text = path.read_text(encoding="utf-8", errors="replace")
    return [" ".join(p.split()) for p in text.split("\n\n") if len(p.strip()) >= min_chars]


def doc_row(doc_id: str, text: str, sentences: list[str] | None = None) -> dict:
    sents = sentences if sentences is not None else [s for s in SENTENCE_END.split(text) if s]
    return {"doc_id": doc_id, "text": text, "sentences": sents, "source": "test", "metadata": "{}"}


def write_corpus(out: Path, shards: list[list[dict]]) -> Path:
    """The corpus stage's layout: shards/part-NNNNN.parquet plus manifest.json."""
    (out / "shards").mkdir(parents=True, exist_ok=True)
    entries = []
    for k, rows in enumerate(shards):
        name = f"shards/part-{k:05d}.parquet"
        pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), out / name)
        entries.append({"name": name, "rows": len(rows), "bytes": (out / name).stat().st_size, "sha256": ""})
    (out / "manifest.json").write_text(json.dumps({"shards": entries, "counts": {}, "config": {}}))
    return out


def train_tokenizer(texts: list[str], out: Path, vocab_size: int = 1500) -> Path:
    """A BERT WordPiece tokenizer trained with `tokenizers` directly, saved as tokenizer.json."""
    tok = Tokenizer(WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    # A Latin-only alphabet: text in other scripts becomes [UNK], as with a vocabulary trained on English.
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                             limit_alphabet=60))
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    return out


@pytest.fixture(scope="module")
def stage_inputs(tmp_path_factory) -> tuple[Path, Path]:
    """Gutenberg paragraphs in two shards, plus an empty shard and the awkward documents."""
    root = tmp_path_factory.mktemp("data_stage")
    paras = [p for f in sorted(SAMPLE.glob("*.txt")) for p in paragraphs(f)][:600]
    rows = [doc_row(f"g{i:04d}", p) for i, p in enumerate(paras)]
    run_on = " ".join(["and then the king spoke"] * 400)  # one "sentence" far longer than any sequence
    awkward = [
        doc_row("empty", "", []),
        doc_row("one-sentence", "A single sentence about nothing in particular, standing alone."),
        doc_row("georgian", "ქართული ენა არის ქართველური ენების ოჯახის ენა. " * 20),
        doc_row("run-on", run_on, [run_on]),
    ]
    corpus = write_corpus(root / "corpus", [rows[:300] + awkward[:2], [], rows[300:] + awkward[2:]])
    tok = train_tokenizer(paras, root / "tokenizer")
    return corpus, tok


def config(tmp_path: Path, **data) -> PipelineConfig:
    return PipelineConfig.model_validate({"workdir": str(tmp_path), "data": {"num_proc": 1, **data}})


@pytest.fixture(scope="module")
def nsp_build(stage_inputs, tmp_path_factory):
    corpus, tok = stage_inputs
    cfg = config(tmp_path_factory.mktemp("nsp"), seq_lengths=[32, 64], heldout_fraction=0.05)
    return build_pretraining_data(cfg, corpus=corpus, tokenizer=tok)


def test_manifest_and_counts(nsp_build, stage_inputs):
    m, s = nsp_build.manifest, nsp_build.stats
    assert (nsp_build.output_dir / "manifest.json").is_file()
    assert m["mode"] == "nsp" and m["seq_lengths"] == [32, 64]
    assert len(m["tokenizer"]["fingerprint"]) == 64 and m["tokenizer"]["vocab_size"] <= 1500
    assert m["corpus"]["manifest_sha256"] and m["config"]["heldout_fraction"] == 0.05
    assert s["documents_input"] == 604
    assert s["empty_shards"] == 1
    assert s["skipped_empty"] == 1 and s["skipped_unk"] == 1
    assert s["one_sentence_docs"] >= 1
    assert s["seq32.train.long_sentences_cut"] >= 1
    assert s["documents"] == s["documents_train"] + s["documents_heldout"] == 602
    for L in ("32", "64"):
        for split in ("train", "heldout"):
            entry = m["phases"][L][split]
            assert entry["instances"] > 0
            # One output shard per non-empty corpus shard, each listed with its counts and checksums.
            assert len(entry["shards"]) == 2
            assert sum(sh["instances"] for sh in entry["shards"]) == entry["instances"]
            for sh in entry["shards"]:
                assert set(sh["sha256"]) == {"input_ids.npy", "offsets.npy", "len_a.npy", "nsp_label.npy"}
                for name, sha in sh["sha256"].items():
                    assert file_sha256(nsp_build.output_dir / sh["dir"] / name) == sha
                assert np.load(nsp_build.output_dir / sh["dir"] / "offsets.npy").dtype == np.int64
    assert "seq 64 heldout" in nsp_build.summary() and "output shards: 2 (0 verified" in nsp_build.summary()


@pytest.mark.parametrize("seq_len", [32, 64])
def test_instances_fit_and_carry_cls_sep_and_token_types(nsp_build, seq_len):
    ds = PretrainingDataset(nsp_build.output_dir, seq_len, "train")
    cls, sep = ds.special_ids["cls"], ds.special_ids["sep"]
    labels = []
    for i in range(len(ds)):
        x = ds[i]
        ids, types = x["input_ids"], x["token_type_ids"]
        assert 5 <= len(ids) <= seq_len
        assert ids[0] == cls and ids[-1] == sep and (ids == sep).sum() == 2 and (ids == cls).sum() == 1
        first_sep = int(np.flatnonzero(ids == sep)[0])
        assert types[: first_sep + 1].sum() == 0 and types[first_sep + 1 :].all()
        labels.append(x["next_sentence_label"])
    assert set(labels) == {0, 1}
    assert 0.45 < np.mean(labels) < 0.55, np.mean(labels)
    assert ds.lengths.max() <= seq_len


def test_rerun_verifies_and_reuses_the_shards_and_is_deterministic(nsp_build, stage_inputs):
    corpus, tok = stage_inputs
    shard_files = sorted((nsp_build.output_dir / "shards").rglob("*.npy"))
    before = {p: p.stat().st_mtime_ns for p in shard_files}
    assert len(before) == 2 * 2 * 4 * 2, "two non-empty corpus shards x two phases x two splits x four arrays"
    cfg = config(nsp_build.output_dir.parent, seq_lengths=[32, 64], heldout_fraction=0.05)
    again = build_pretraining_data(cfg, corpus=corpus, tokenizer=tok)
    assert again.stats["shards_reused"] == 2
    assert {p: p.stat().st_mtime_ns for p in shard_files} == before
    assert again.manifest["phases"] == nsp_build.manifest["phases"]
    first = PretrainingDataset(again.output_dir, 64)[3]["input_ids"]
    assert first.tolist() == PretrainingDataset(nsp_build.output_dir, 64)[3]["input_ids"].tolist()


def test_packed_mode(stage_inputs, tmp_path):
    corpus, tok = stage_inputs
    result = build_pretraining_data(config(tmp_path, mode="packed", seq_lengths=[64]), corpus=corpus, tokenizer=tok)
    ds = PretrainingDataset(result.output_dir, 64)
    lengths = ds.lengths
    assert lengths.max() <= 64 and lengths.mean() > 48
    x = ds[0]
    assert x["next_sentence_label"] == -100 and x["token_type_ids"].sum() == 0
    assert x["input_ids"][0] == ds.special_ids["cls"] and x["input_ids"][-1] == ds.special_ids["sep"]
    assert result.stats["seq64.train.tokens"] + result.stats["seq64.heldout.tokens"] >= result.stats["corpus_tokens"]


def test_loader_and_collator_over_the_memory_mapped_data(nsp_build):
    ds = PretrainingDataset(nsp_build.output_dir, 64, "heldout")
    ds = pickle.loads(pickle.dumps(ds))  # what a worker process receives: reopens its memory maps lazily
    collator = MLMCollator(ds.special_ids, ds.vocab_size, seed=0)
    batches = list(DistributedLoader(ds, 4, collator, rank=0, world_size=1, seed=0))
    assert sum(b["input_ids"].shape[0] for b in batches) == len(ds)
    assert all(b["input_ids"].shape[1] <= 64 and b["input_ids"].max() < ds.vocab_size for b in batches)


def test_our_batch_trains_transformers_bert(nsp_build):
    """The batch contract (flat masked positions) maps onto the labels of transformers' BertForPreTraining."""
    transformers = pytest.importorskip("transformers")
    ds = PretrainingDataset(nsp_build.output_dir, 32)
    batch = MLMCollator(ds.special_ids, ds.vocab_size, seed=0)([ds[i] for i in range(8)])
    labels = torch.full_like(batch["input_ids"], -100).reshape(-1)
    labels[batch["masked_positions"]] = batch["masked_labels"]
    config = transformers.BertConfig(vocab_size=ds.vocab_size, hidden_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    model = transformers.BertForPreTraining(config)
    out = model(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"],
                attention_mask=batch["attention_mask"], labels=labels.view_as(batch["input_ids"]),
                next_sentence_label=batch["next_sentence_label"])
    assert torch.isfinite(out.loss) and out.loss.item() > 0


def test_heldout_split_is_by_document_and_deterministic():
    held = heldout_rows(100_000, 0.02, seed=7, shard=3)
    assert 0.018 < held.mean() < 0.022
    assert heldout_rows(100_000, 0.02, seed=7, shard=3).tolist() == held.tolist()
    assert heldout_rows(100_000, 0.02, seed=8, shard=3).tolist() != held.tolist()
    assert heldout_rows(100_000, 0.02, seed=7, shard=4).tolist() != held.tolist()


def test_held_out_documents_never_reach_the_training_split(nsp_build):
    """Each document's instances are in one split only (the B pool is split too): no held-out text in training."""
    def doc_texts(split: str) -> set[tuple[int, ...]]:
        ds = PretrainingDataset(nsp_build.output_dir, 64, split)
        sep = ds.special_ids["sep"]
        out = set()
        for i in range(len(ds)):
            ids = ds[i]["input_ids"].tolist()
            a_end = ids.index(sep)
            out.update({tuple(ids[1:a_end]), tuple(ids[a_end + 1 : -1])})
        return {t for t in out if len(t) >= 12}

    assert not doc_texts("train") & doc_texts("heldout")


def test_bad_inputs_raise_clear_errors(stage_inputs, tmp_path):
    corpus, tok = stage_inputs
    with pytest.raises(InputError, match="no corpus"):
        build_pretraining_data(config(tmp_path), corpus=tmp_path / "nowhere", tokenizer=tok)
    empty = write_corpus(tmp_path / "empty_corpus", [[], []])
    with pytest.raises(InputError, match="empty"):
        build_pretraining_data(config(tmp_path), corpus=empty, tokenizer=tok)
    broken = write_corpus(tmp_path / "broken_corpus", [[doc_row("a", "Some text. More text.")]])
    (broken / "shards" / "part-00000.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(InputError, match="cannot read corpus shard"):
        build_pretraining_data(config(tmp_path), corpus=broken, tokenizer=tok)
    no_mask = json.loads((tok / "tokenizer.json").read_text())
    no_mask["added_tokens"] = [t for t in no_mask["added_tokens"] if t["content"] != "[MASK]"]
    del no_mask["model"]["vocab"]["[MASK]"]
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text(json.dumps(no_mask))
    with pytest.raises(InputError, match=r"\[MASK\]"):
        build_pretraining_data(config(tmp_path), corpus=corpus, tokenizer=tmp_path / "tok")


def test_a_phase_that_was_not_built_is_a_clear_error(nsp_build):
    with pytest.raises(InputError, match="seq_len=128"):
        PretrainingDataset(nsp_build.output_dir, 128)


@pytest.fixture(scope="module")
def wikipedia_corpus(tmp_path_factory) -> Path:
    wiki = SHARED_DATA / "corpus" / "wikipedia"
    if not wiki.is_dir():
        pytest.skip(f"shared Wikipedia extract not found at {wiki}; set BERTSCALE_SHARED_DATA")
    rows = []
    for f in sorted(wiki.iterdir())[:3]:
        for m in re.finditer(r'<doc id="(\d+)"[^>]*>\n(.*?)</doc>', f.read_text(encoding="utf-8"), re.S):
            lines = [ln.strip() for ln in m.group(2).splitlines()[1:] if ln.strip()]
            sents = [s for ln in lines for s in SENTENCE_END.split(ln) if s]
            rows.append(doc_row(m.group(1), " ".join(lines), sents))
    return write_corpus(tmp_path_factory.mktemp("wiki") / "corpus", [rows[: len(rows) // 2], rows[len(rows) // 2 :]])


def test_shared_wikipedia_extract(wikipedia_corpus, tmp_path):
    texts = [t for t in pq.read_table(wikipedia_corpus / "shards" / "part-00000.parquet")["text"].to_pylist() if t]
    tok = train_tokenizer(texts[:2000], tmp_path / "tok", vocab_size=4000)
    result = build_pretraining_data(config(tmp_path, seq_lengths=[128], heldout_fraction=0.01),
                                    corpus=wikipedia_corpus, tokenizer=tok)
    s = result.stats
    # Title-only stubs have no sentences: skipped and counted, never silently lost.
    assert s["skipped_empty"] > 0
    assert s["documents"] + s["skipped_empty"] + s["skipped_unk"] == s["documents_input"]
    assert s["seq128.train.instances"] > 1000
    assert 0.45 < s["seq128.train.nsp_random_ratio"] < 0.55, s["seq128.train.nsp_random_ratio"]
    ds = PretrainingDataset(result.output_dir, 128)
    assert ds.lengths.max() <= 128


def test_whole_word_collator_from_the_tokenizer(nsp_build, stage_inputs):
    from bertscale.tokenizer import load_tokenizer

    tok = load_tokenizer(stage_inputs[1])
    collator = MLMCollator.for_tokenizer(tok, whole_word_mask=True, seed=1)
    ds = PretrainingDataset(nsp_build.output_dir, 64)
    batch = collator([ds[i] for i in range(16)])
    ids = batch["input_ids"].reshape(-1)
    selected = torch.zeros_like(ids, dtype=torch.bool)
    selected[batch["masked_positions"]] = True
    originals = ids.clone()
    originals[batch["masked_positions"]] = batch["masked_labels"]
    continuation = torch.from_numpy(collator.is_continuation)[originals]
    # Every selected continuation piece has its word's previous piece selected too, and vice versa (a piece
    # right after [CLS]/[SEP], where truncation cut a word, starts a word of its own).
    special = torch.tensor(sorted(set(ds.special_ids.values())))
    follows = continuation[1:] & ~torch.isin(originals[:-1], special)
    assert torch.equal(selected[1:][follows], selected[:-1][follows])
    assert selected[1:][follows].any()


def test_model_mismatch_is_caught_at_start(nsp_build):
    ds = PretrainingDataset(nsp_build.output_dir, 64)
    ds.check_compatible(ds.vocab_size, 512)
    with pytest.raises(ConfigError, match="vocab_size"):
        ds.check_compatible(ds.vocab_size + 1, 512)
    with pytest.raises(ConfigError, match="max_position_embeddings"):
        ds.check_compatible(ds.vocab_size, 32)


def test_another_tokenizer_of_the_same_size_is_caught_at_start(nsp_build, stage_inputs):
    from bertscale.tokenizer import build_wordpiece, load_tokenizer

    _, tok_dir = stage_inputs
    ds = PretrainingDataset(nsp_build.output_dir, 64)
    used = load_tokenizer(tok_dir)
    ds.check_compatible(ds.vocab_size, 512, tokenizer=used)
    vocab = used.get_vocab()
    by_id = sorted(vocab, key=vocab.get)
    ds.check_compatible(ds.vocab_size, 512, tokenizer=build_wordpiece(vocab))  # the same tokenizer, rebuilt
    # A retrained vocabulary of the same size: two ordinary tokens trade ids.
    a, b = by_id[100], by_id[200]
    swapped = build_wordpiece({**vocab, a: vocab[b], b: vocab[a]})
    with pytest.raises(ConfigError, match=r"another tokenizer.*rebuild the data with this tokenizer"):
        ds.check_compatible(ds.vocab_size, 512, tokenizer=swapped)
    # The same vocabulary, cased: same ids for the same tokens, other ids for the same text.
    with pytest.raises(ConfigError, match="another tokenizer"):
        ds.check_compatible(ds.vocab_size, 512, tokenizer=build_wordpiece(vocab, lowercase=False))
    pad_moved = build_wordpiece({**vocab, "[PAD]": vocab[a], a: vocab["[PAD]"]})
    with pytest.raises(ConfigError, match=r"special token ids .*'pad': 0.*'pad': 100"):
        ds.check_compatible(ds.vocab_size, 512, tokenizer=pad_moved)


# ----------------------------------------------------------------------------------------------------------------
# Sharded, resumable, parallel output
# ----------------------------------------------------------------------------------------------------------------
def output_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted((root / "shards").rglob("*")) if p.is_file()}


def test_output_is_identical_whatever_num_proc(stage_inputs, nsp_build, tmp_path):
    corpus, tok = stage_inputs
    cfg = config(tmp_path, seq_lengths=[32, 64], heldout_fraction=0.05, num_proc=2)
    two = build_pretraining_data(cfg, corpus=corpus, tokenizer=tok)
    assert two.manifest["phases"] == nsp_build.manifest["phases"]
    ours, theirs = output_files(two.output_dir), output_files(nsp_build.output_dir)
    assert ours.keys() == theirs.keys() and len(ours) > 30
    assert [k for k in ours if ours[k] != theirs[k]] == []


def test_a_killed_run_resumes_from_its_complete_shards(stage_inputs, nsp_build, tmp_path, monkeypatch):
    corpus, tok = stage_inputs
    cfg = config(tmp_path, seq_lengths=[32, 64], heldout_fraction=0.05)
    import bertscale.data.build as build

    real, built = build.build_shard, []

    def killed_after_one(job):
        if built:
            raise KeyboardInterrupt  # the process dies while the second shard is being built
        built.append(job.index)
        return real(job)

    monkeypatch.setattr(build, "build_shard", killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        build_pretraining_data(cfg, corpus=corpus, tokenizer=tok)
    out = cfg.stage_dir("data")
    assert not (out / "manifest.json").exists()
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["00000"]
    first = (out / "shards" / "00000" / "shard.json").stat().st_mtime_ns
    # A half-written shard directory (no completion marker) and a temporary directory of the killed run.
    (out / "shards" / "00001" / "seq32").mkdir(parents=True)
    (out / "shards" / "00001" / "seq32" / "input_ids.npy").write_bytes(b"partial")
    (out / "shards" / ".tmp-00001-4242").mkdir()
    monkeypatch.setattr(build, "build_shard", real)
    again = build_pretraining_data(cfg, corpus=corpus, tokenizer=tok)
    assert again.stats["shards_reused"] == 1
    assert (out / "shards" / "00000" / "shard.json").stat().st_mtime_ns == first
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["00000", "00001"]
    assert output_files(out) == output_files(nsp_build.output_dir)


def test_a_damaged_shard_is_rebuilt(stage_inputs, tmp_path):
    corpus, tok = stage_inputs
    cfg = config(tmp_path, mode="packed", seq_lengths=[32], heldout_fraction=0.05)
    first = build_pretraining_data(cfg, corpus=corpus, tokenizer=tok)
    target = first.output_dir / "shards" / "00001" / "seq32" / "train" / "input_ids.npy"
    good = target.read_bytes()
    target.write_bytes(good[:-2] + b"\x00\x01")
    again = build_pretraining_data(cfg, corpus=corpus, tokenizer=tok)
    assert again.stats["shards_reused"] == 1 and target.read_bytes() == good


def test_an_unreadable_shard_fails_the_build_naming_it(stage_inputs, tmp_path):
    _, tok = stage_inputs
    rows = [doc_row(f"d{i}", f"Sentence number {i} is here. And another one follows it.") for i in range(3000)]
    corpus = write_corpus(tmp_path / "corpus", [rows[:1500], rows[1500:]])
    path = corpus / "shards" / "part-00001.parquet"
    chunk = pq.ParquetFile(path).metadata.row_group(0).column(2)  # the `sentences` column
    assert chunk.path_in_schema.startswith("sentences")
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    raw = bytearray(path.read_bytes())
    raw[start : start + 64] = b"\xff" * 64  # its pages damaged, the footer intact: only reading the data finds it
    path.write_bytes(bytes(raw))
    cfg = config(tmp_path, seq_lengths=[32])
    with pytest.raises(InputError, match=r"cannot read corpus shard .*part-00001\.parquet"):
        build_pretraining_data(cfg, corpus=corpus, tokenizer=tok)
    assert not (cfg.stage_dir("data") / "manifest.json").exists()


def test_disk_full_is_an_input_error_and_nothing_is_complete(stage_inputs, tmp_path, monkeypatch):
    corpus, tok = stage_inputs

    def full(path, arr):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(np, "save", full)
    cfg = config(tmp_path, seq_lengths=[32])
    with pytest.raises(InputError, match=r"cannot write .*\.npy: No space left on device"):
        build_pretraining_data(cfg, corpus=corpus, tokenizer=tok)
    out = cfg.stage_dir("data")
    assert not (out / "manifest.json").exists()
    assert not list(out.rglob("shard.json")) and not list(out.rglob("pool.json"))


def test_a_single_held_out_document_still_gets_nsp_pairs(stage_inputs, tmp_path):
    """With fewer than two held-out documents there is no other held-out document to take B from: held-out
    pairs borrow B from training text instead of failing (training never sees held-out text either way)."""
    _, tok = stage_inputs
    paras = [p for f in sorted(SAMPLE.glob("*.txt")) for p in paragraphs(f)][:40]
    corpus = write_corpus(tmp_path / "corpus", [[doc_row(f"p{i}", p) for i, p in enumerate(paras)]])
    fraction = next(f for f in np.arange(0.01, 0.2, 0.005) if heldout_rows(40, f, 12345, 0).sum() == 1)
    result = build_pretraining_data(config(tmp_path, seq_lengths=[64], heldout_fraction=float(fraction)),
                                    corpus=corpus, tokenizer=tok)
    assert result.stats["documents_heldout"] == 1
    held = PretrainingDataset(result.output_dir, 64, "heldout")
    assert len(held) > 0 and {held[i]["next_sentence_label"] for i in range(len(held))} <= {0, 1}
