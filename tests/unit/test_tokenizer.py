"""Unit tests of the WordPiece tokenizer stage on tiny in-memory and tmp-dir corpora."""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bertscale.config import PipelineConfig, TokenizerConfig
from bertscale.errors import ConfigError, InputError
from bertscale.tokenizer import (
    CorpusStream,
    build_wordpiece,
    canonical_order,
    check_compatible,
    encode_batch_for_datasets,
    load_tokenizer,
    resolve_corpus_files,
    save_tokenizer,
    special_ids,
    tokenizer_fingerprint,
    train_tokenizer,
    train_wordpiece,
)
from bertscale.tokenizer.wordpiece import text_bytes

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "A café in Zürich serves naïve customers crème brûlée.",
    "Tokenizers split words into word pieces; pieces join into words.",
    "北京 is the capital of China and 東京 is the capital of Japan.",
    "Emma Woodhouse, handsome, clever, and rich, had lived nearly twenty-one years.",
] * 20
MINI_VOCAB = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4}


def _train(**overrides) -> object:
    tcfg = TokenizerConfig(vocab_size=300, min_frequency=1, **overrides)
    return train_wordpiece(tcfg, iter([TEXTS[i : i + 10] for i in range(0, len(TEXTS), 10)]))


@pytest.fixture(scope="module")
def tok():
    return _train()


def _write_parquet(path: Path, texts: list[str | None], column: str = "text") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({column: pa.array(texts, pa.string())}), path)
    return path


def test_special_token_ids(tok) -> None:
    ids = special_ids(tok)
    assert ids == {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
    # Special tokens in running text stay whole instead of being split into pieces.
    assert tok.encode("a [MASK] b", add_special_tokens=False).tokens[1] == "[MASK]"


def test_post_processor_pairs_with_token_types(tok) -> None:
    a, b = tok.encode("quick fox", add_special_tokens=False), tok.encode("lazy dog", add_special_tokens=False)
    enc = tok.encode("quick fox", "lazy dog")
    assert enc.tokens == ["[CLS]", *a.tokens, "[SEP]", *b.tokens, "[SEP]"]
    assert enc.type_ids == [0] * (len(a.ids) + 2) + [1] * (len(b.ids) + 1)
    single = tok.encode("quick fox")
    assert single.tokens == ["[CLS]", *a.tokens, "[SEP]"] and set(single.type_ids) == {0}


def test_lowercase_and_accent_options() -> None:
    uncased = build_wordpiece(MINI_VOCAB, lowercase=True)
    cased = build_wordpiece(MINI_VOCAB, lowercase=False)
    strip = build_wordpiece(MINI_VOCAB, lowercase=True, strip_accents=True)
    no_strip = build_wordpiece(MINI_VOCAB, lowercase=True, strip_accents=False)
    assert uncased.normalizer.normalize_str("Café Zürich") == "cafe zurich"
    assert cased.normalizer.normalize_str("Café Zürich") == "Café Zürich"
    assert strip.normalizer.normalize_str("Café") == "cafe"
    assert no_strip.normalizer.normalize_str("Café") == "café"


def test_missing_cls_in_vocab_is_an_input_error() -> None:
    with pytest.raises(InputError, match=r"\[CLS\]"):
        build_wordpiece({"[UNK]": 0, "a": 1})


def test_cased_training_keeps_case() -> None:
    cased = _train(lowercase=False)
    vocab = cased.get_vocab()
    assert "Emma" in vocab or "E" in vocab
    assert "emma" not in vocab


def test_cjk_characters_split_one_per_token(tok) -> None:
    tokens = tok.encode("北京東京", add_special_tokens=False).tokens
    assert tokens == ["北", "京", "東", "京"]
    no_split = build_wordpiece(MINI_VOCAB, handle_chinese_chars=False)
    assert no_split.normalizer.normalize_str("北京") == "北京"
    assert build_wordpiece(MINI_VOCAB).normalizer.normalize_str("北京") == " 北  京 "


def test_save_writes_hf_layout_and_reloads(tok, tmp_path: Path) -> None:
    result = save_tokenizer(tok, tmp_path / "t", {"unk_rate": 0.5})
    names = {p.name for p in (tmp_path / "t").iterdir()}
    assert {"tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json",
            "bertscale_tokenizer.json"} <= names
    vocab_lines = (tmp_path / "t" / "vocab.txt").read_text(encoding="utf-8").splitlines()
    assert len(vocab_lines) == result.vocab_size == tok.get_vocab_size()
    assert vocab_lines[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    meta = json.loads((tmp_path / "t" / "bertscale_tokenizer.json").read_text())
    assert meta["fingerprint"] == result.fingerprint == tokenizer_fingerprint(tok)
    assert meta["stats"]["unk_rate"] == 0.5
    again = load_tokenizer(tmp_path / "t")
    assert again.encode(TEXTS[1], TEXTS[3]).ids == tok.encode(TEXTS[1], TEXTS[3]).ids
    assert load_tokenizer(tmp_path / "t" / "tokenizer.json").encode(TEXTS[0]).ids == tok.encode(TEXTS[0]).ids


@pytest.mark.parametrize("lowercase", [True, False])
def test_load_from_vocab_txt_only(lowercase: bool, tmp_path: Path) -> None:
    trained = _train(lowercase=lowercase)
    save_tokenizer(trained, tmp_path / "full")
    only = tmp_path / "vocab_only"
    only.mkdir()
    (only / "vocab.txt").write_bytes((tmp_path / "full" / "vocab.txt").read_bytes())
    (only / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": lowercase}))
    rebuilt = load_tokenizer(only)
    for a, b in [(TEXTS[0], TEXTS[1]), (TEXTS[3], TEXTS[4])]:
        assert rebuilt.encode(a, b).ids == trained.encode(a, b).ids
        assert rebuilt.encode(a, b).type_ids == trained.encode(a, b).type_ids
    assert tokenizer_fingerprint(rebuilt) == tokenizer_fingerprint(trained)


def test_load_missing_tokenizer_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no tokenizer at"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(InputError, match="cannot load tokenizer file"):
        load_tokenizer(tmp_path)


def test_fingerprint_is_stable_and_vocab_sensitive(tok, tmp_path: Path) -> None:
    save_tokenizer(tok, tmp_path / "t")
    assert tokenizer_fingerprint(load_tokenizer(tmp_path / "t")) == tokenizer_fingerprint(tok)
    assert tokenizer_fingerprint(_train(lowercase=False)) != tokenizer_fingerprint(tok)
    ab = build_wordpiece({**MINI_VOCAB, "a": 5, "b": 6})
    ba = build_wordpiece({**MINI_VOCAB, "b": 5, "a": 6})
    assert tokenizer_fingerprint(ab) != tokenizer_fingerprint(ba)
    # Trained ids are renumbered canonically, so the trainer's run-to-run id order does not leak into them.
    assert tokenizer_fingerprint(canonical_order(ab)) == tokenizer_fingerprint(canonical_order(ba))
    assert canonical_order(ba).token_to_id("a") == 5


def test_fingerprint_covers_the_normalizer_settings() -> None:
    # Same vocabulary, different normalization: other ids for the same text, so another tokenized cache.
    vocab = {**MINI_VOCAB, "a": 5, "b": 6, "##c": 7}
    base = tokenizer_fingerprint(build_wordpiece(vocab))
    assert tokenizer_fingerprint(build_wordpiece(vocab, lowercase=False)) != base
    assert tokenizer_fingerprint(build_wordpiece(vocab, strip_accents=False)) != base
    assert tokenizer_fingerprint(build_wordpiece(vocab, handle_chinese_chars=False)) != base
    # strip_accents=None follows lowercase, as in BERT: the same behaviour, the same fingerprint.
    assert tokenizer_fingerprint(build_wordpiece(vocab, lowercase=True, strip_accents=True)) == base


def test_trained_ids_are_in_canonical_order(tok) -> None:
    tokens = sorted(tok.get_vocab(), key=tok.get_vocab().get)
    assert tokens[:5] == list(MINI_VOCAB) and tokens[5:] == sorted(tokens[5:])


def test_check_compatible_mismatches(tok) -> None:
    check_compatible(tok, tok.get_vocab_size())
    with pytest.raises(ConfigError, match=rf"has {tok.get_vocab_size()} tokens but the model's vocab_size is 999"):
        check_compatible(tok, 999)
    no_mask = build_wordpiece({"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "a": 4})
    with pytest.raises(ConfigError, match=r"\[MASK\]"):
        check_compatible(no_mask, 5)
    with pytest.raises(InputError, match=r"\[MASK\]"):
        special_ids(no_mask)


def test_corpus_stream_holds_out_a_seeded_sample_and_counts_empties(tmp_path: Path) -> None:
    docs = [f"document number {i}" for i in range(40)]
    a = _write_parquet(tmp_path / "a.parquet", docs[:15] + [None, "  "])
    empty = _write_parquet(tmp_path / "b.parquet", [])
    c = _write_parquet(tmp_path / "c.parquet", docs[15:])
    stream = CorpusStream([a, empty, c], batch_size=4, heldout=3, seed=1)
    trained = [d for batch in stream for d in batch]
    assert stream.total_docs == 42 and stream.heldout_target == 3
    assert len(stream.heldout) <= 3 and set(stream.heldout).isdisjoint(trained)
    assert sorted(trained + stream.heldout, key=docs.index) == docs and trained == sorted(trained, key=docs.index)
    assert stream.counts["empty_files"] == 1
    assert stream.counts["empty_docs"] + stream.counts["train_docs"] + len(stream.heldout) == 42


def test_training_sample_is_bounded_seeded_and_independent_of_batching(tmp_path: Path) -> None:
    docs = [f"document number {i} " + "word " * (i % 7) for i in range(2000)]
    files = [_write_parquet(tmp_path / f"{i}.parquet", docs[i * 500:(i + 1) * 500]) for i in range(4)]
    total = sum(text_bytes(f) for f in files)

    def trained(batch_size: int, sample: int | None) -> tuple[list[str], CorpusStream]:
        stream = CorpusStream(files, batch_size=batch_size, heldout=20, seed=3, sample_bytes=sample)
        return [d for batch in stream for d in batch], stream

    everything, full = trained(64, None)
    assert full.fraction == 1 and full.counts["unsampled_docs"] == 0 and len(everything) == 2000 - 20
    quarter, stream = trained(64, total // 4)
    assert stream.fraction == pytest.approx(0.25, rel=1e-6)
    assert abs(len(quarter) - stream.expected_train_docs) < 80  # ~495 of 1980
    assert set(quarter) <= set(everything) and set(quarter).isdisjoint(stream.heldout)
    assert stream.counts["train_docs"] + stream.counts["unsampled_docs"] + len(stream.heldout) == 2000
    assert trained(7, total // 4)[0] == quarter  # the sample does not depend on the batch size
    assert CorpusStream(files, 64, 20, seed=4, sample_bytes=total // 4).heldout_target == 20
    assert [d for b in CorpusStream(files, 64, 20, seed=4, sample_bytes=total // 4) for d in b] != quarter
    assert trained(64, total * 2)[0] == everything  # a corpus smaller than the sample is used whole


def test_corpus_stream_reports_progress_while_the_trainer_reads(tmp_path: Path, capsys, caplog) -> None:
    files = [_write_parquet(tmp_path / f"{i}.parquet", [f"doc {i} {j}" for j in range(30)]) for i in range(2)]
    with caplog.at_level(logging.INFO, logger="bertscale.tokenizer.wordpiece"):
        trained = [d for batch in CorpusStream(files, batch_size=20, heldout=6) for d in batch]
    assert len(trained) == 54
    # Off a terminal (a log, a flow run's output) the stage's own bar counts the documents read.
    bar = capsys.readouterr().err.split("\r")[-1]
    assert bar.startswith("tokenizer: reading: 100%") and "60/60" in bar and "trained=54" in bar
    lines = [r.getMessage() for r in caplog.records]
    assert lines[-1].startswith("tokenizer: all 60 documents read in") and "54 trained on" in lines[-1]
    assert "computing the vocabulary" in lines[-1]


def test_heldout_sample_is_seeded_and_not_the_tail(tmp_path: Path) -> None:
    # Corpus shards are in source order, so the last rows are one source's documents: a biased held-out set.
    docs = [f"document number {i}" for i in range(1000)]
    files = [_write_parquet(tmp_path / f"{i}.parquet", docs[i * 100:(i + 1) * 100]) for i in range(10)]

    def held(seed: int) -> list[str]:
        stream = CorpusStream(files, batch_size=64, heldout=50, seed=seed)
        for _ in stream:
            pass
        return stream.heldout

    first = held(0)
    assert len(first) == 50 and first == held(0) and first != held(1)
    assert len({docs.index(d) // 100 for d in first}) >= 5  # spread over the sources, not only the last one


def test_read_heldout_reads_only_files_holding_the_sample(tmp_path: Path) -> None:
    files = [_write_parquet(tmp_path / f"{i}.parquet", [f"doc {i}-{j}" for j in range(5)]) for i in range(20)]
    stream = CorpusStream(files, batch_size=3, heldout=4, seed=3)
    holding = {int(p) // 5 for p in stream.heldout_positions}
    assert len(holding) < len(files)
    for i, f in enumerate(files):
        if i not in holding:
            f.write_bytes(b"not parquet any more")  # would raise if it were read again
    held = stream.read_heldout()
    assert held == [f"doc {p // 5}-{p % 5}" for p in stream.heldout_positions]
    assert stream.counts["train_docs"] == 0


def test_heldout_is_capped_to_a_tenth_of_the_corpus(tmp_path: Path) -> None:
    f = _write_parquet(tmp_path / "a.parquet", [f"doc {i}" for i in range(25)])
    stream = CorpusStream([f], batch_size=10, heldout=200)
    assert sum(len(b) for b in stream) == 23 and len(stream.heldout) == 2


def test_resolve_corpus_files(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    for name in ["part-00001.parquet", "part-00000.parquet"]:
        _write_parquet(corpus / "shards" / name, ["x"])
    manifest = {"shards": [{"name": "shards/part-00001.parquet"}, {"name": "shards/part-00000.parquet"}]}
    (corpus / "manifest.json").write_text(json.dumps(manifest))
    # The manifest's order wins over the file names'.
    assert [p.name for p in resolve_corpus_files(corpus)] == ["part-00001.parquet", "part-00000.parquet"]
    assert [p.name for p in resolve_corpus_files(f"{corpus}/**/*.parquet")] == ["part-00000.parquet",
                                                                                "part-00001.parquet"]
    (tmp_path / "notes.md").write_text("x")
    with pytest.raises(InputError, match="neither .parquet nor .txt"):
        resolve_corpus_files(tmp_path / "notes.md")
    with pytest.raises(InputError, match="does not exist"):
        resolve_corpus_files(tmp_path / "nowhere")
    (corpus / "manifest.json").write_text(json.dumps({"shards": [{"name": "shards/gone.parquet"}]}))
    with pytest.raises(InputError, match="missing shards"):
        resolve_corpus_files(corpus)


def _cfg(tmp_path: Path, **tokenizer) -> PipelineConfig:
    return PipelineConfig(workdir=str(tmp_path / "run"), tokenizer={"vocab_size": 300, "min_frequency": 1,
                                                                     **tokenizer})


def test_train_tokenizer_on_parquet_and_txt(tmp_path: Path) -> None:
    _write_parquet(tmp_path / "in" / "a.parquet", TEXTS[:60])
    (tmp_path / "in" / "b.txt").write_text("\n\n".join(TEXTS[60:]), encoding="utf-8")
    result = train_tokenizer(_cfg(tmp_path, heldout_docs=5), corpus=tmp_path / "in")
    assert result.output_dir == tmp_path / "run" / "tokenizer"
    assert result.vocab_size == load_tokenizer(result.output_dir).get_vocab_size()
    s = result.stats
    assert s["train_docs"] == 95 and s["heldout_docs"] == 5 and s["input_files"] == 2
    assert 0 <= s["unk_rate"] < 0.05 and 1.0 <= s["tokens_per_word"] < 3.0
    assert "held-out: 5 docs" in result.summary()


def test_non_utf8_txt_is_read_as_cp1252_and_counted(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "old.txt").write_bytes("\n\n".join(TEXTS[:3] * 10 + ["It’s “quoted”."]).encode("cp1252"))
    result = train_tokenizer(_cfg(tmp_path, heldout_docs=0), corpus=tmp_path / "in")
    assert result.stats["non_utf8_files"] == 1
    assert {"’", "“", "”"} <= set(load_tokenizer(result.output_dir).get_vocab())


def test_bad_corpora_raise_input_errors(tmp_path: Path) -> None:
    _write_parquet(tmp_path / "empty" / "a.parquet", [])
    with pytest.raises(InputError, match="holds no documents"):
        train_tokenizer(_cfg(tmp_path), corpus=tmp_path / "empty")
    _write_parquet(tmp_path / "blank" / "a.parquet", ["", None, "   "])
    with pytest.raises(InputError, match="all 3 documents are empty"):
        train_tokenizer(_cfg(tmp_path, heldout_docs=0), corpus=tmp_path / "blank")
    _write_parquet(tmp_path / "other" / "a.parquet", ["x"], column="body")
    with pytest.raises(InputError, match="no column 'text'.*tokenizer.text_column"):
        train_tokenizer(_cfg(tmp_path), corpus=tmp_path / "other")
    result = train_tokenizer(_cfg(tmp_path, text_column="body", heldout_docs=0), corpus=tmp_path / "other")
    assert result.stats["train_docs"] == 1
    with pytest.raises(InputError, match="run `bertscale corpus` first"):
        train_tokenizer(_cfg(tmp_path))


def test_pretrained_dir_is_imported_in_our_layout(tok, tmp_path: Path) -> None:
    save_tokenizer(tok, tmp_path / "full")
    vocab_only = tmp_path / "vocab_only"
    vocab_only.mkdir()
    (vocab_only / "vocab.txt").write_bytes((tmp_path / "full" / "vocab.txt").read_bytes())
    _write_parquet(tmp_path / "corpus" / "a.parquet", TEXTS)
    result = train_tokenizer(_cfg(tmp_path, pretrained=str(vocab_only), heldout_docs=10),
                             corpus=tmp_path / "corpus")
    assert result.fingerprint == tokenizer_fingerprint(tok)
    assert (result.output_dir / "tokenizer.json").is_file()
    assert result.stats["heldout_docs"] == 10 and result.stats["tokens_per_word"] > 1.0
    assert load_tokenizer(result.output_dir).encode(TEXTS[0], TEXTS[1]).ids == tok.encode(TEXTS[0], TEXTS[1]).ids


def test_datasets_encoder_matches_encode_and_pickles_without_the_tokenizer(tok, tmp_path: Path) -> None:
    save_tokenizer(tok, tmp_path / "t")
    fn = encode_batch_for_datasets(tmp_path / "t")
    nested = fn({"sentences": [[TEXTS[0], TEXTS[1]], [], [TEXTS[3]]]})["input_ids"]
    plain = lambda t: tok.encode(t, add_special_tokens=False).ids  # noqa: E731
    assert nested == [[plain(TEXTS[0]), plain(TEXTS[1])], [], [plain(TEXTS[3])]]
    flat = encode_batch_for_datasets(tmp_path / "t", column="text", output="ids")({"text": [TEXTS[2], None]})
    assert flat == {"ids": [plain(TEXTS[2]), []]}
    state = pickle.dumps(fn)
    assert len(state) < 2000  # the path and fingerprint, never the serialized tokenizer
    clone = pickle.loads(state)
    assert clone._tok is None and clone.fingerprint == tokenizer_fingerprint(tok)
    assert clone({"sentences": [[TEXTS[4]]]})["input_ids"] == [[plain(TEXTS[4])]]
    with pytest.raises(InputError, match="no column 'sentences'"):
        fn({"text": ["x"]})


def test_heldout_stats_count_unknown_tokens_and_words(tok) -> None:
    from bertscale.tokenizer import heldout_stats

    known = tok.encode("the fox", add_special_tokens=False)
    assert len(known.ids) == 2 and 1 not in known.ids
    stats = heldout_stats(tok, ["the fox ☃", "the fox"])
    # "☃" is outside the trained alphabet: 1 [UNK] among 5 tokens, over 5 whitespace words.
    assert stats == {"heldout_docs": 2, "heldout_tokens": 5, "unk_rate": 0.2, "tokens_per_word": 1.0}
