"""Task registry and loaders: the shared GLUE files (row and label counts), GLUE layouts we cannot ship (MNLI,
QQP, AX), users' CSV/TSV/JSONL tasks, and bad input that must fail with the file and line."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from bertscale.config import CustomTaskConfig, FinetuneConfig
from bertscale.errors import ConfigError, InputError
from bertscale.finetune.tasks import GLUE_TASKS, get_task, hparams_for, load_eval, load_test, load_train

# (task, train rows, dev rows, dev label counts by label string, test rows), from the data README / VERIFY.md.
GLUE_COUNTS = [
    ("CoLA", 8551, 1043, {"0": 322, "1": 721}, 1063),
    ("SST-2", 67349, 872, {"0": 428, "1": 444}, 1821),
    ("MRPC", 3668, 408, {"0": 129, "1": 279}, 1725),
    ("STS-B", 5749, 1500, None, 1379),
    ("RTE", 2490, 277, {"entailment": 146, "not_entailment": 131}, 3000),
    ("WNLI", 635, 71, {"0": 40, "1": 31}, 146),
]


@pytest.mark.parametrize("name,train,dev,dev_labels,test", GLUE_COUNTS)
def test_shared_glue_counts(shared_data: Path, name: str, train: int, dev: int, dev_labels: dict | None,
                            test: int) -> None:
    glue = shared_data / "glue"
    task = get_task(name)
    tr = load_train(task, glue)
    assert len(tr.dataset) == train and tr.skipped == 0
    (ev,) = load_eval(task, glue)
    assert len(ev.dataset) == dev
    if dev_labels is not None:
        assert Counter(task.labels[i] for i in ev.dataset["label"]) == dev_labels
    else:
        assert min(ev.dataset["label"]) == 0.0 and max(ev.dataset["label"]) == 5.0
    (te,) = load_test(task, glue)
    assert len(te.dataset) == test and "label" not in te.dataset.column_names
    assert te.dataset["idx"][:2] == ["0", "1"]


def test_shared_qnli_dev_and_texts(shared_data: Path) -> None:
    (ev,) = load_eval(get_task("qnli"), shared_data / "glue")
    assert len(ev.dataset) == 5463
    assert Counter(ev.dataset["label"]) == {0: 2702, 1: 2761}
    row = ev.dataset[0]
    assert row["text_a"].startswith("What came into force") and row["text_b"].startswith("As of that day")


def test_quotes_are_plain_characters(shared_data: Path) -> None:
    # MRPC dev line 2 opens a quote that never closes: a quoting CSV reader would swallow later rows.
    (ev,) = load_eval(get_task("MRPC"), shared_data / "glue")
    assert ev.dataset["text_b"][0].startswith('"The foodservice pie business')


def _write(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def _tsv(*fields: str) -> str:
    return "\t".join(fields)


def test_mnli_layout_matched_and_mismatched(tmp_path: Path) -> None:
    header = _tsv("index", "promptID", "pairID", "genre", "s1bp", "s2bp", "s1p", "s2p", "sentence1", "sentence2",
                  "label1", "gold_label")
    row = lambda i, lab: _tsv(str(i), "p", "q", "g", "x", "x", "x", "x", f"premise {i}", f"hyp {i}", lab, lab)
    for f in ("train.tsv", "dev_matched.tsv", "dev_mismatched.tsv"):
        _write(tmp_path / "MNLI" / f, [header, row(0, "neutral"), row(1, "contradiction"), row(2, "entailment")])
    test_header = _tsv("index", "promptID", "pairID", "genre", "s1bp", "s2bp", "s1p", "s2p", "sentence1", "sentence2")
    _write(tmp_path / "MNLI" / "test_matched.tsv", [test_header, _tsv("7", "p", "q", "g", "x", "x", "x", "x", "a", "b")])
    _write(tmp_path / "AX" / "diagnostic.tsv", [_tsv("index", "sentence1", "sentence2"), _tsv("0", "a", "b")])
    mnli = get_task("MNLI")
    evals = load_eval(mnli, tmp_path)
    assert [e.name for e in evals] == ["MNLI-m", "MNLI-mm"]
    assert evals[0].dataset["label"] == [2, 0, 1]  # contradiction, entailment, neutral as in GLUE's processor
    assert evals[0].dataset["text_a"][0] == "premise 0" and evals[0].dataset["text_b"][0] == "hyp 0"
    tests = load_test(mnli, tmp_path)  # test_mismatched.tsv is absent: left out, not an error
    assert [t.name for t in tests] == ["MNLI-m"] and tests[0].dataset["idx"] == ["7"]
    (ax,) = load_test(get_task("AX"), tmp_path)
    assert ax.name == "AX" and ax.dataset["text_b"] == ["b"]


def test_qqp_skips_rows_with_missing_fields_and_counts_them(tmp_path: Path) -> None:
    header = _tsv("id", "qid1", "qid2", "question1", "question2", "is_duplicate")
    _write(tmp_path / "QQP" / "train.tsv", [header, _tsv("0", "1", "2", "q a", "q b", "1"),
                                             _tsv("1", "3", "4", "only one question"), _tsv("2", "5", "6", "x", "y", "0")])
    split = load_train(get_task("QQP"), tmp_path)
    assert len(split.dataset) == 2 and split.skipped == 1
    assert split.dataset["label"] == [1, 0]


def test_label_outside_label_set_names_file_and_line(tmp_path: Path) -> None:
    f = _write(tmp_path / "RTE" / "train.tsv", [_tsv("index", "sentence1", "sentence2", "label"),
                                                _tsv("0", "a", "b", "entailment"), _tsv("1", "a", "b", "maybe")])
    with pytest.raises(InputError, match=rf"{f}:3: label 'maybe' is not one of RTE's labels"):
        load_train(get_task("RTE"), tmp_path)


def test_wrong_delimiter_and_short_rows(tmp_path: Path) -> None:
    _write(tmp_path / "RTE" / "train.tsv", ["index,sentence1,sentence2,label", "0,a,b,entailment"])
    with pytest.raises(InputError, match=r"train.tsv:2: .*tab-separated"):
        load_train(get_task("RTE"), tmp_path)
    _write(tmp_path / "STS-B" / "train.tsv", [_tsv(*"abcdefghij"), _tsv("0", "g", "f", "y", "0", "n", "n", "s1", "2.5")])
    with pytest.raises(InputError, match=r"train.tsv:2: .*needs at least 10"):
        load_train(get_task("STS-B"), tmp_path)


def test_empty_split_and_missing_file(tmp_path: Path) -> None:
    _write(tmp_path / "SST-2" / "train.tsv", [_tsv("sentence", "label")])
    with pytest.raises(InputError, match="has no data rows"):
        load_train(get_task("SST-2"), tmp_path)
    with pytest.raises(InputError, match="dev.tsv does not exist; check finetune.glue_dir"):
        load_eval(get_task("SST-2"), tmp_path)


def test_unknown_task_and_name_variants() -> None:
    assert get_task("sst2").name == "SST-2" and get_task("sts_b").name == "STS-B"
    with pytest.raises(ConfigError, match="unknown task 'GLUEX'"):
        get_task("GLUEX")


def test_hparams_defaults_and_overrides() -> None:
    rte = GLUE_TASKS["RTE"]
    assert rte.defaults.batch_size == 16 and rte.defaults.lr == 2e-5 and rte.defaults.epochs == 3
    hp = hparams_for(rte, FinetuneConfig(lr=5e-5, max_length=64), batch_size=32)
    assert (hp.lr, hp.batch_size, hp.max_length, hp.warmup_ratio) == (5e-5, 32, 64, 0.1)


def test_custom_csv_jsonl_tasks(tmp_path: Path) -> None:
    csv_file = tmp_path / "reviews.csv"
    csv_file.write_text('id,review,stars\n1,"good, really",pos\n2,bad,neg\n3,"fine ""ok""",pos\n')
    c = CustomTaskConfig(name="reviews", train=str(csv_file), dev=str(csv_file), text_a="review", label="stars",
                         index="id")
    task = get_task("reviews", [c])
    assert task.labels == ("neg", "pos") and task.metrics == ("accuracy",)
    ds = load_train(task, None).dataset
    assert ds["text_a"] == ["good, really", "bad", 'fine "ok"'] and ds["label"] == [1, 0, 1] and ds["idx"][0] == "1"
    jl = tmp_path / "sim.jsonl"
    jl.write_text("\n".join(json.dumps({"a": f"x{i}", "b": "y", "score": i / 2}) for i in range(4)) + "\n")
    reg = get_task("sim", [CustomTaskConfig(name="sim", train=str(jl), text_a="a", text_b="b", label="score",
                                            kind="regression")])
    assert reg.num_labels == 1 and reg.metrics == ("pearson", "spearman")
    assert load_train(reg, None).dataset["label"] == [0.0, 0.5, 1.0, 1.5]


def test_custom_task_bad_input(tmp_path: Path) -> None:
    semi = tmp_path / "semi.csv"
    semi.write_text("text;label\nhello;a\nbye;b\n")
    c = CustomTaskConfig(name="t", train=str(semi), labels=["a", "b"])
    with pytest.raises(InputError, match=r"semi.csv:2: no field 'text_a' .*check the delimiter"):
        load_train(get_task("t", [c]), None)
    good = tmp_path / "t.csv"
    good.write_text("text_a,label\nhi,a\nho,c\n")
    c = CustomTaskConfig(name="t", train=str(good), labels=["a", "b"])
    with pytest.raises(InputError, match=r"t.csv:3: label 'c' is not one of t's labels \['a', 'b'\]"):
        load_train(get_task("t", [c]), None)
    bad_json = tmp_path / "t.jsonl"
    bad_json.write_text('{"text_a": "x", "label": "a"}\n{"text_a": "y", "label": \n')
    with pytest.raises(InputError, match=r"t.jsonl:2: not valid JSON"):
        load_train(get_task("t", [CustomTaskConfig(name="t", train=str(bad_json), labels=["a", "b"])]), None)


def test_ax_in_glues_diagnostic_folder_and_in_ax(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # GLUE's download script writes diagnostic/diagnostic.tsv; some copies use AX/. Both are found.
    lines = [_tsv("index", "sentence1", "sentence2"), _tsv("0", "a", "b"), _tsv("1", "c", "d")]
    _write(tmp_path / "glue" / "diagnostic" / "diagnostic.tsv", lines)
    (ax,) = load_test(get_task("AX"), tmp_path / "glue")
    assert ax.dataset["idx"] == ["0", "1"] and ax.source.endswith("diagnostic/diagnostic.tsv")
    _write(tmp_path / "copy" / "AX" / "diagnostic.tsv", lines[:2])
    (ax,) = load_test(get_task("AX"), tmp_path / "copy")
    assert ax.dataset["idx"] == ["0"]
    # Absent: left out of the submission, with a warning (the GLUE server needs every file).
    assert load_test(get_task("AX"), tmp_path / "empty") == []
    assert any(r.levelname == "WARNING" and "AX.tsv is left out" in r.getMessage() for r in caplog.records)


def test_custom_tsv_has_no_quote_handling(tmp_path: Path) -> None:
    # Five data lines, two of which open a quote that a quoting reader would carry across lines.
    rows = ['"Tis the season\tshakespeare', "plain words\tdickens", '"quoted" start, then text\tdickens',
            "another line\tshakespeare", 'ends with a quote"\tdickens']
    tsv = _write(tmp_path / "authors.tsv", ["sentence\tlabel", *rows])
    task = get_task("authors", [CustomTaskConfig(name="authors", train=str(tsv), text_a="sentence")])
    ds = load_train(task, None).dataset
    assert ds["text_a"] == [r.split("\t")[0] for r in rows]
    assert [task.labels[i] for i in ds["label"]] == ["shakespeare", "dickens", "dickens", "shakespeare", "dickens"]
    # CSV keeps its quoting: a quoted comma stays in the field.
    csv_file = _write(tmp_path / "a.csv", ["sentence,label", '"one, two",dickens', "three,shakespeare"])
    c = CustomTaskConfig(name="a", train=str(csv_file), text_a="sentence")
    assert load_train(get_task("a", [c]), None).dataset["text_a"] == ["one, two", "three"]


def test_custom_rows_with_extra_fields_name_file_and_line(tmp_path: Path) -> None:
    tsv = _write(tmp_path / "t.tsv", ["text\tlabel", "fine\ta", "a stray\ttab\tb"])
    c = CustomTaskConfig(name="t", train=str(tsv), text_a="text", labels=["a", "b"])
    with pytest.raises(InputError, match=r"t.tsv:3: 3 fields but the header has 2; a text field contains a tab"):
        load_train(get_task("t", [c]), None)
    csv_file = _write(tmp_path / "t.csv", ["text,label", "one, two,a"])
    c = CustomTaskConfig(name="t", train=str(csv_file), text_a="text", labels=["a", "b"])
    with pytest.raises(InputError, match=r"t.csv:2: 3 fields .*quote fields that contain commas"):
        load_train(get_task("t", [c]), None)


def test_a_custom_task_can_set_its_own_max_length():
    own = CustomTaskConfig(name="qa", kind="question_answering", train="t.json", max_length=384)
    plain = CustomTaskConfig(name="c", train="t.csv", labels=["no", "yes"])
    ft = FinetuneConfig(max_length=128)
    assert hparams_for(get_task("qa", [own]), ft).max_length == 384
    assert hparams_for(get_task("c", [plain]), ft).max_length == 128
    assert hparams_for(get_task("RTE"), ft).max_length == 128
