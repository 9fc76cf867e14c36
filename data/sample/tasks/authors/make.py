"""Builds the sample classification task: which author wrote a sentence (Austen, Chesterton or Shakespeare).

Sentences come from public-domain Project Gutenberg texts that are NOT in the sample pretraining corpus
(Austen's Emma, Chesterton's The Wisdom of Father Brown, Shakespeare's Hamlet), so fine-tuning measures
transfer rather than memorisation. Run from the repository root with the texts' directory as argument:
    python data/sample/tasks/authors/make.py ../shared/data/corpus/gutenberg/gutenberg
"""

import random
import sys
from pathlib import Path

from bertscale.corpus import split_sentences

SOURCES = {"austen": "austen-emma.txt", "chesterton": "chesterton-brown.txt", "shakespeare": "shakespeare-hamlet.txt"}
TRAIN, DEV = 600, 150
BOILERPLATE = ("gutenberg", "etext", "small print", "royalt", "printer", "copyright", "warrant", "[*]", "proofing")


def sentences(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8", errors="replace")
    text = text[len(text) // 20:]  # skip title pages and editors' prefaces
    # Some e-texts carry Project Gutenberg's licence ("small print") in the middle: not the author's words.
    paragraphs = [" ".join(p.split()) for p in text.split("\n\n")]
    paragraphs = [p for p in paragraphs if not any(w in p.lower() for w in BOILERPLATE)]
    out = [s for p in paragraphs for s in split_sentences(p)]
    return sorted({s for s in out if 8 <= len(s.split()) <= 50 and "\t" not in s})


def main(root: Path) -> None:
    rng = random.Random(13)
    train, dev = [], []
    for label, name in SOURCES.items():
        sents = sentences(root / name)
        rng.shuffle(sents)
        train += [(s, label) for s in sents[:TRAIN]]
        dev += [(s, label) for s in sents[TRAIN:TRAIN + DEV]]
    here = Path(__file__).parent
    for split, rows in (("train", train), ("dev", dev)):
        rng.shuffle(rows)
        lines = ["sentence\tlabel"] + [f"{s}\t{label}" for s, label in rows]
        (here / f"{split}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
