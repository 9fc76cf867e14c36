"""Decontamination cores: normalisation, n-gram hashing and lookup, document and passage removal, the eval file
readers and their errors, the config, the task files derived from the fine-tuning config, the fingerprint, and
the stage on tiny inputs (counts, report, invariant)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bertscale import lineage
from bertscale.config import DecontaminationConfig, EvalFileConfig, load_config
from bertscale.corpus.decontaminate import (
    Decontaminator,
    EvalIndex,
    NgramHasher,
    build_index,
    normalize,
    normalized_bytes,
)
from bertscale.corpus.eval_sets import EvalFileStats, eval_texts, read_eval_file
from bertscale.corpus.pipeline import run_plain
from bertscale.errors import ConfigError, InputError

# 14 words across a sentence boundary: its 13-grams include "... lazy dog a second ...".
EVAL = "The quick brown fox jumps over the lazy dog. A second sentence follows it here."
FILLER = "Meanwhile, several unrelated remarks about gardening and the weather filled the long afternoon."


def index_of(tmp_path: Path, texts: dict[tuple[str, str], list[str]], n: int = 13) -> EvalIndex:
    entries = []
    for (task, split), rows in texts.items():
        path = tmp_path / f"{task}-{split}.jsonl"
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
        entries.append(EvalFileConfig(task=task, split=split, path=str(path), format="jsonl", text_columns=["text"]))
    return build_index(DecontaminationConfig(ngram=n, eval_files=entries))[0]


def test_normalisation_ignores_case_punctuation_diacritics_and_ptb_clitics():
    assert normalize("It's a CAFÉ — naïve, isn't it?") == normalize("it 's a cafe -- naive , is n't it") \
        == "its a cafe naive isnt it"
    # Punctuation is deleted, not made a space (as datatrove and GPT-3 do): joined words stay joined.
    assert normalize("well-known\u00a0fact_s\n\tx\u2014y") == "wellknown facts xy"
    assert normalize("Stra\u00dfe \u65e5\u672c \ufb01ne \u00b2") == "stra\u00dfe \u65e5\u672c fine 2"
    assert b"\n" not in normalized_bytes("a\nb\r\nc")  # newlines separate texts in a batch


def test_a_13_gram_across_a_sentence_boundary_matches_whatever_the_punctuation_and_case(tmp_path):
    index = index_of(tmp_path, {("RTE", "dev"): [EVAL]})
    dec = Decontaminator(index)
    shifted = f"{FILLER} the QUICK brown fox -- jumps over the lazy dog; a second sentence follows. {FILLER}"
    missing_word = f"{FILLER} The quick brown fox jumps over the lazy dog. A second sentence follows. {FILLER}"
    assert dec.scan([FILLER, shifted, missing_word.replace("second ", "")]) == [{}, {0: 13}, {}]
    # A single sentence of the eval text is not 13 words: it does not match on its own.
    assert dec.scan([f"{FILLER} The quick brown fox jumps over the lazy dog. {FILLER}"]) == [{}]


def test_hashes_do_not_depend_on_the_batch_or_the_hashing_path(tmp_path):
    texts = [normalized_bytes(t) for t in (FILLER, EVAL, "short one", "", EVAL + " " + FILLER)]
    hasher = NgramHasher(5)
    together = hasher.hashes(texts)
    alone = [NgramHasher(5).hashes([t])[0] for t in texts]
    for i, h in enumerate(alone):
        assert h.tolist() == together[0][together[1] == i].tolist()
    assert together[2][together[1] == 4].tolist() == list(range(len(together[2][together[1] == 4])))
    long_path = NgramHasher(5)
    long_path.DIRECT_BYTES = 8  # the per-word exponent path that huge batches take
    assert all((a == b).all() for a, b in zip(long_path.hashes(texts), together))


def test_index_lookup_equals_a_set_lookup():
    rng = np.random.default_rng(0)
    keys = np.unique(rng.integers(0, 2**63, size=5000, dtype=np.uint64))
    records = np.empty(len(keys), dtype=[("hash", "<u8"), ("source", "<u4")])
    records["hash"], records["source"] = keys, 0
    index = EvalIndex(13, [("T", "dev")], records)
    queries = np.concatenate([keys[::3], rng.integers(0, 2**63, size=20000, dtype=np.uint64)])
    assert (index.contains(queries) == np.isin(queries, keys)).all()
    assert not EvalIndex(13, [], records[:0]).contains(queries).any()


def test_index_round_trips_and_keeps_every_source_of_a_shared_ngram(tmp_path):
    index = index_of(tmp_path, {("QNLI", "dev"): [EVAL], ("QNLI", "test"): [EVAL, FILLER + " " + FILLER]})
    index.save(str(tmp_path / "idx"))
    loaded = EvalIndex.load(str(tmp_path / "idx"))
    assert loaded.sources == [("QNLI", "dev"), ("QNLI", "test")] and len(loaded) == len(index)
    found = Decontaminator(loaded).scan([EVAL])[0]
    assert found == {0: 0, 1: 0}


def test_document_mode_reports_the_first_matching_ngram_per_source(tmp_path):
    index = index_of(tmp_path, {("RTE", "dev"): [EVAL], ("SST-2", "test"): [FILLER]})
    dec = Decontaminator(index)
    text = f"Intro words here. {EVAL} {FILLER}"
    outcome = dec.resolve(text, dec.scan([text])[0])
    assert outcome.text is None and outcome.passages == 0
    assert outcome.ngrams == {0: "the quick brown fox jumps over the lazy dog a second sentence follows",
                              1: " ".join(normalize(FILLER).split()[:13])}


def test_passage_mode_drops_the_sentences_an_ngram_touches_and_keeps_the_layout(tmp_path):
    dec = Decontaminator(index_of(tmp_path, {("RTE", "dev"): [EVAL]}), mode="passage")
    text = f"First paragraph stays.\n\nKept before. {EVAL} Kept after.\nNext line stays.\n\nLast paragraph."
    outcome = dec.resolve(text, dec.scan([text])[0])
    assert outcome.passages == 2  # "The quick ... dog." and "A second sentence follows it here."
    assert outcome.text == "First paragraph stays.\n\nKept before. Kept after.\nNext line stays.\n\nLast paragraph."


def test_passage_mode_checks_again_after_a_removal_joins_sentences(tmp_path):
    words = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike".split()
    dec = Decontaminator(index_of(tmp_path, {("T", "dev"): [" ".join(words), EVAL]}), mode="passage")
    # Removing the middle (matching) sentence makes its neighbours adjacent: together they are the other 13-gram.
    text = f"{' '.join(words[:6])}. {EVAL} {' '.join(words[6:]).capitalize()}. An unrelated closing sentence."
    outcome = dec.resolve(text, dec.scan([text])[0])
    assert outcome.text == "An unrelated closing sentence." and outcome.passages == 4
    assert dec.resolve(EVAL, dec.scan([EVAL])[0]).text is None  # nothing left: the document goes


def test_readers_of_every_format(tmp_path):
    (tmp_path / "g.tsv").write_text('id\ts1\ts2\n0\t"quoted\tsecond\n1\tonly one\n\n')
    (tmp_path / "c.csv").write_text('a,b\n"x, y",z\n')
    (tmp_path / "d.jsonl").write_text('{"tokens": ["EU", "rejects"], "q": "why"}\n\n{"q": "how"}\n')
    (tmp_path / "e.conll").write_text("-DOCSTART- -X- O\n\nEU B-ORG\nrejects O\n\nPeter B-PER\n")
    (tmp_path / "s.json").write_text(json.dumps({"data": [{"paragraphs": [
        {"context": "Ctx one.", "qas": [{"question": "Q1?", "answers": []}]}]}]}))
    entries = [
        EvalFileConfig(task="G", path=str(tmp_path / "g.tsv"), format="glue-tsv", text_columns=[1, 2]),
        EvalFileConfig(task="C", path=str(tmp_path / "c.csv"), format="csv", text_columns=["a", "b"]),
        EvalFileConfig(task="J", path=str(tmp_path / "d.jsonl"), format="jsonl", text_columns=["tokens", "q"]),
        EvalFileConfig(task="N", path=str(tmp_path / "e.conll"), format="conll"),
        EvalFileConfig(task="S", split="test", path=str(tmp_path / "s.json"), format="squad"),
    ]
    assert list(eval_texts(entries)) == [
        ("G", "dev", '"quoted'), ("G", "dev", "second"), ("G", "dev", "only one"), ("C", "dev", "x, y"),
        ("C", "dev", "z"), ("J", "dev", "EU rejects"), ("J", "dev", "why"), ("J", "dev", "how"),
        ("N", "dev", "EU rejects"), ("N", "dev", "Peter"), ("S", "test", "Ctx one."), ("S", "test", "Q1?")]
    stats = EvalFileStats("G", "dev", "g.tsv", "glue-tsv")
    list(read_eval_file(entries[0], stats))
    assert stats.incomplete_rows == 1 and stats.texts == 3 and len(stats.sha256) == 64


@pytest.mark.parametrize("name,content,fmt,columns,message", [
    ("missing.tsv", None, "glue-tsv", [0], r"missing.tsv \(T dev\) cannot be read"),
    ("bad.jsonl", '{"q": "a"}\n{oops\n', "jsonl", ["q"], r"bad.jsonl:2: not valid JSON"),
    ("list.jsonl", '["a"]\n', "jsonl", ["q"], r"list.jsonl:1: expected a JSON object"),
    ("nocol.csv", "a,b\n1,2\n", "csv", ["text"], r"no column\(s\) \['text'\] in the header \['a', 'b'\]"),
    ("wrongcol.tsv", "x\ty\n", "glue-tsv", [5], r"no text read as glue-tsv from columns \[5\]"),
    ("noctx.json", json.dumps({"data": [{"paragraphs": [{"qas": []}]}]}), "squad", [],
     r"data\[0\].paragraphs\[0\] has no context"),
    ("noq.json", json.dumps({"data": [{"paragraphs": [{"context": "c", "qas": [{"id": 1}]}]}]}), "squad", [],
     r"data\[0\].paragraphs\[0\].qas\[0\] has no question"),
    ("latin1.tsv", "caf\xe9\n".encode("latin-1"), "glue-tsv", [0], r"latin1.tsv: not UTF-8"),
])
def test_bad_eval_files_are_one_line_errors_naming_the_file(tmp_path, name, content, fmt, columns, message):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    entry = EvalFileConfig(task="T", path=str(path), format=fmt, text_columns=columns, header=False)
    with pytest.raises(InputError, match=message) as err:
        list(read_eval_file(entry))
    assert "\n" not in str(err.value) and name in str(err.value)


@pytest.mark.parametrize("entry,message", [
    ("{task: T, path: p, format: glue-tsv, text_columns: [a]}", "glue-tsv takes text_columns as 0-based indices"),
    ("{task: T, path: p, format: csv}", "csv needs text_columns"),
    ("{task: T, path: p, format: squad, text_columns: [c]}", "squad files need no text_columns"),
    ("{task: a/b, path: p, format: squad}", "task"),
    ("{task: T, path: p, format: xml}", "format"),
])
def test_eval_file_config_is_validated(entry, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [f"corpus.decontamination.eval_files=[{entry}]"])


def test_task_eval_files_from_the_finetune_config(tmp_path, shared_data):
    (tmp_path / "train.csv").write_text("text,label\na,0\nb,1\n")
    (tmp_path / "dev.csv").write_text("text,label\na,0\n")
    cfg = load_config(None, [f"finetune.glue_dir={shared_data / 'glue'}", "finetune.tasks=[CoLA,QNLI,mine]"],
                      extra={"finetune": {"custom_tasks": [{"name": "mine", "train": str(tmp_path / "train.csv"),
                                                            "dev": str(tmp_path / "dev.csv"), "text_a": "text"}]}})
    got = [(e.task, e.split, Path(e.path).name, e.format, e.text_columns, e.header)
           for e in lineage.task_eval_files(cfg)]
    assert got == [("CoLA", "dev", "dev.tsv", "glue-tsv", [3], False),
                   ("CoLA", "test", "test.tsv", "glue-tsv", [1], True),
                   ("QNLI", "dev", "dev.tsv", "glue-tsv", [1, 2], True),
                   ("QNLI", "test", "test.tsv", "glue-tsv", [1, 2], True),
                   ("mine", "dev", "dev.csv", "csv", ["text"], True)]
    hub_only = load_config(None, ["finetune.tasks=[RTE]"])
    assert lineage.task_eval_files(hub_only) == []


def test_the_corpus_fingerprint_follows_eval_file_content_and_settings(tmp_path):
    eval_file = tmp_path / "dev.jsonl"
    eval_file.write_text('{"text": "one"}\n')
    entry = f"corpus.decontamination.eval_files=[{{task: T, path: {eval_file}, format: jsonl, text_columns: [text]}}]"

    def fp(*extra: str) -> str:
        return lineage.stage_fingerprint(load_config(None, [entry, *extra]), "corpus", ["inputs"])

    first = fp()
    eval_file.touch()
    assert fp() == first  # a touched, unchanged file
    eval_file.write_text('{"text": "two"}\n')
    assert fp() != first and fp("corpus.decontamination.ngram=8") != fp()
    assert fp("corpus.decontamination.enabled=false") != fp()


SENTENCE = "The committee met on Tuesday to discuss the budget for the coming year and agreed on it."


def article(i: int) -> str:
    return " ".join(f"Article {i} talks about topic {i * 7 % 13} and item {j}." for j in range(30))


@pytest.mark.parametrize("mode", ["document", "passage"])
def test_the_stage_removes_counts_and_reports_contaminated_documents(tmp_path, mode):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(4):
        (inputs / f"b{i}.txt").write_text(article(i))
    (inputs / "hit.txt").write_text(f"{article(7)} {EVAL.upper()} {article(8)}")
    (inputs / "copy.txt").write_text(f"{article(7)} {EVAL} {article(8)}")  # a duplicate that matches as well
    (tmp_path / "dev.tsv").write_text(f"id\tsentence\n1\t{EVAL}\n2\tshort\n")
    cfg = load_config(None, [f"workdir={tmp_path / 'work'}", f"corpus.inputs=[{inputs}]",
                             "corpus.runner.num_workers=1", "corpus.target_shard_bytes=4096",
                             f"corpus.decontamination.mode={mode}",
                             f"corpus.decontamination.eval_files=[{{task: RTE, path: {tmp_path / 'dev.tsv'}, "
                             "format: glue-tsv, text_columns: [1]}]"])
    result = run_plain(cfg)
    c = result.counts
    assert c["read"] == c["kept"] + c["filtered"] + c["duplicates"] + c["quarantined"] + c["decontaminated"]
    assert c["decontaminated_task_RTE"] == 2
    report = [json.loads(line) for line in (result.output_dir / "decontamination.jsonl").read_text().splitlines()]
    assert [(r["doc_id"].split("/")[-1], r["task"], r["split"]) for r in report] == [
        ("copy.txt#000000000000", "RTE", "dev"), ("hit.txt#000000000000", "RTE", "dev")]
    assert report[0]["ngram"].startswith("the quick brown fox")
    section = result.manifest["decontamination"]
    assert section["active"] and section["documents"] == {"RTE": {"dev": 2}}
    assert section["eval_files"][0]["texts"] == 2 and section["eval_files"][0]["short_texts"] == 1
    if mode == "document":
        assert c["decontaminated"] == 2 and c["kept"] == 4 and c["duplicates"] == 0
        assert {r["action"] for r in report} == {"document"}
    else:  # both keep their articles, which are then exact duplicates of each other
        assert c["decontaminated"] == 0 and c["decontaminated_edited"] == 2 and c["exact_duplicates"] == 1
        assert {r["action"] for r in report} == {"passages"} and c["decontaminated_passages"] == 4
    assert "decontaminated" in result.summary()


def test_without_eval_files_nothing_is_checked(tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "a.txt").write_text(f"{article(1)} {EVAL}")
    result = run_plain(load_config(None, [f"workdir={tmp_path / 'work'}", f"corpus.inputs=[{inputs}]",
                                          "corpus.runner.num_workers=1"]))
    assert result.counts["kept"] == 1 and result.counts["decontaminated"] == 0
    assert result.manifest["decontamination"]["active"] is False
    assert (result.output_dir / "decontamination.jsonl").read_text() == ""


def test_command_line_errors_are_one_line(tmp_path, capsys):
    from bertscale.cli import main

    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "a.txt").write_text(article(1))
    base = ["corpus", str(inputs), "--no-tracking", "--workdir", str(tmp_path / "w"), "--num-workers", "1"]
    assert main([*base, "--decontaminate", "RTE"]) == 2
    assert capsys.readouterr().err.strip().endswith("no dev or test file found for RTE; give --glue-dir (a local "
                                                    "GLUE copy) or define the tasks in finetune.custom_tasks")
    missing = tmp_path / "gone.tsv"
    assert main([*base, "--set", f"corpus.decontamination.eval_files=[{{task: RTE, path: {missing}, "
                                 "format: glue-tsv, text_columns: [1]}]"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(missing) in err and "cannot be read" in err


def test_the_flow_adds_the_task_files_once_and_not_when_disabled(tmp_path, shared_data):
    from pipelines.corpus import with_task_eval_files

    cfg = load_config(None, [f"finetune.glue_dir={shared_data / 'glue'}", "finetune.tasks=[RTE]"])
    once = with_task_eval_files(cfg)
    assert [(e.task, e.split) for e in once.corpus.decontamination.eval_files] == [("RTE", "dev"), ("RTE", "test")]
    assert with_task_eval_files(once).corpus.decontamination.eval_files == once.corpus.decontamination.eval_files
    assert cfg.corpus.decontamination.eval_files == []  # the caller's config is not changed
    off = load_config(None, [f"finetune.glue_dir={shared_data / 'glue'}", "finetune.tasks=[RTE]",
                             "corpus.decontamination.enabled=false"])
    assert with_task_eval_files(off).corpus.decontamination.eval_files == []
