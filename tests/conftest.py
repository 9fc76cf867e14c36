"""Fixtures shared by every tier: where the real data lives, and isolated MLflow/Prefect state."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("BERTSCALE_SHARED_DATA", REPO.parent / "shared" / "data"))
SAMPLE_CORPUS = REPO / "data" / "sample"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real data directory (GLUE, Wikipedia, Gutenberg); tests that need it skip with a reason if absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}; set BERTSCALE_SHARED_DATA")
    return SHARED_DATA


@pytest.fixture(scope="session")
def sample_corpus() -> Path:
    return SAMPLE_CORPUS


@pytest.fixture(scope="session")
def prefect_harness():
    """A real, temporary Prefect server (SQLite) for the tests that run flows."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def pytest_collection_modifyitems(config, items):
    # Mark tiers by folder so `-m "not e2e"` and friends work without decorating every test.
    for item in items:
        path = str(item.fspath)
        if f"{os.sep}integration{os.sep}" in path:
            item.add_marker(pytest.mark.integration)
        elif f"{os.sep}e2e{os.sep}" in path:
            item.add_marker(pytest.mark.e2e)


def make_keyword_task(tmp_path: Path, words: list[str], k: int, rows: int):
    """A CSV yes/no keyword task and a tiny random-init HF checkpoint with a tokenizer trained on its text."""
    import random

    import torch

    from bertscale.config import CustomTaskConfig, TokenizerConfig
    from bertscale.model import BertConfig, BertForPreTraining
    from bertscale.model.hf import export_hf
    from bertscale.tokenizer import save_tokenizer, train_wordpiece

    torch.set_num_threads(1)
    rng = random.Random(0)
    examples = [(f"{' '.join(rng.choices(words, k=k))} {'yes' if i % 2 else 'no'}", i % 2) for i in range(rows)]
    data = tmp_path / "task.csv"
    data.write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in examples))
    ckpt = tmp_path / "ckpt"
    vocab = save_tokenizer(train_wordpiece(TokenizerConfig(vocab_size=60, min_frequency=1),
                                           iter([[t for t, _ in examples]])), ckpt).vocab_size
    torch.manual_seed(0)
    export_hf(BertForPreTraining(BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=1,
                                            num_attention_heads=2, intermediate_size=64,
                                            max_position_embeddings=32)), ckpt)
    return CustomTaskConfig(name="yesno", train=str(data), dev=str(data), text_a="text"), ckpt
