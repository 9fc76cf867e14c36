"""Small synthetic inputs shared by unit tests of several modules."""

from __future__ import annotations

import numpy as np

from bertscale.data.instances import TokenizedDocs


def synthetic_docs(n_docs: int, seed: int = 0, max_sents: int = 12, max_len: int = 40) -> TokenizedDocs:
    """Documents with distinct token ids everywhere (also across seeds), so that a span's tokens say which
    document and position they come from."""
    rng = np.random.default_rng(seed)
    docs, next_id = [], 10 + 10_000 * seed
    for _ in range(n_docs):
        sents = []
        for _ in range(int(rng.integers(1, max_sents + 1))):
            n = int(rng.integers(1, max_len + 1))
            sents.append(list(range(next_id, next_id + n)))
            next_id += n
        docs.append(sents)
    return TokenizedDocs.from_lists(docs)
