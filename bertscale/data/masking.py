"""Dynamic MLM masking and padding at batch time.

Masking happens when a batch is built, not when the data is written, so every epoch sees a fresh mask
(RoBERTa's dynamic masking). The collator pads only to the longest sequence of the batch and returns the flat
positions of the masked tokens with their labels, so that the model runs its MLM head on those positions only.
Its only randomness is one `numpy.random.Generator`, whose state the loader saves for exact resume.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from bertscale.data.instances import NSP_IGNORE

SPECIAL_KEYS = ("pad", "unk", "cls", "sep", "mask")


def continuation_lookup(tokenizer: Any) -> np.ndarray:
    """Boolean array over the vocabulary: True for WordPiece continuation pieces (`##...`).

    `tokenizer` is a `tokenizers.Tokenizer`; the lookup is what whole-word masking needs to find word starts.
    """
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    lookup = np.zeros(max(vocab.values()) + 1, dtype=bool)
    for piece, idx in vocab.items():
        lookup[idx] = piece.startswith("##")
    return lookup


class MLMCollator:
    """Turns a list of instances (dicts from `PretrainingDataset`) into a masked, padded batch of tensors.

    Selection: round(mask_prob * n) of the n maskable tokens of each sequence (at least one), never [PAD],
    [CLS], [SEP], [MASK] or [UNK]. Of the selected tokens 80% become [MASK], 10% a random non-special token and
    10% stay as they are. With `whole_word_mask`, a word (a token plus its following `##` pieces) is selected or
    left as a whole.

    With `document_attention`, the attention mask of a packed sequence (NSP label -100) numbers its documents
    1, 2, ... instead of holding 1 everywhere: a document runs through the [SEP] that closes it, and the model
    keeps attention inside each document (see `bertscale.model.bert`). NSP pairs keep HF's 0/1 mask.
    """

    def __init__(
        self,
        special_ids: Mapping[str, int],
        vocab_size: int,
        mask_prob: float = 0.15,
        whole_word_mask: bool = False,
        seed: int = 0,
        is_continuation: np.ndarray | None = None,
        pad_to_multiple_of: int | None = None,
        document_attention: bool = False,
    ) -> None:
        missing = [k for k in SPECIAL_KEYS if k not in special_ids]
        if missing:
            raise ValueError(f"special_ids lacks {missing}; expected keys {list(SPECIAL_KEYS)}")
        if not 0 < mask_prob < 1:
            raise ValueError(f"mask_prob must be in (0, 1), got {mask_prob}")
        if whole_word_mask and is_continuation is None:
            raise ValueError("whole_word_mask needs is_continuation (see continuation_lookup(tokenizer))")
        self.special_ids = {k: int(special_ids[k]) for k in SPECIAL_KEYS}
        self.vocab_size = int(vocab_size)
        self.mask_prob = float(mask_prob)
        self.whole_word_mask = whole_word_mask
        self.pad_to_multiple_of = pad_to_multiple_of
        self.document_attention = document_attention
        self.is_continuation = None if is_continuation is None else np.asarray(is_continuation, dtype=bool)
        specials = np.array(sorted(set(self.special_ids.values())), dtype=np.int64)
        self._special = specials
        # Random replacements never produce a special token: the model must not see a stray [SEP] or [CLS].
        self._random_pool = np.setdiff1d(np.arange(self.vocab_size, dtype=np.int64), specials)
        self.rng = np.random.default_rng(seed)

    @classmethod
    def for_tokenizer(cls, tokenizer: Any, mask_prob: float = 0.15, whole_word_mask: bool = False,
                      seed: int = 0, pad_to_multiple_of: int | None = None) -> "MLMCollator":
        """A collator with the special ids, vocabulary size and continuation lookup of a `tokenizers.Tokenizer`."""
        from bertscale.tokenizer import special_ids

        lookup = continuation_lookup(tokenizer)
        return cls(special_ids(tokenizer), tokenizer.get_vocab_size(with_added_tokens=True), mask_prob=mask_prob,
                   whole_word_mask=whole_word_mask, seed=seed, is_continuation=lookup,
                   pad_to_multiple_of=pad_to_multiple_of)

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.rng.bit_generator.state = state["rng"]

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        input_ids, token_type_ids, attention_mask = self._pad(examples)
        original = input_ids.copy()
        selected = self._select(input_ids, attention_mask)
        self._corrupt(input_ids, selected)
        flat = np.flatnonzero(selected)
        nsp = np.array([int(e["next_sentence_label"]) for e in examples], dtype=np.int64)
        return {
            "input_ids": torch.from_numpy(input_ids),
            "token_type_ids": torch.from_numpy(token_type_ids),
            "attention_mask": torch.from_numpy(attention_mask),
            "masked_positions": torch.from_numpy(flat.astype(np.int64)),
            "masked_labels": torch.from_numpy(original.reshape(-1)[flat].astype(np.int64)),
            "next_sentence_label": torch.from_numpy(nsp),
        }

    def _pad(self, examples: Sequence[Mapping[str, Any]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        lengths = [len(e["input_ids"]) for e in examples]
        width = max(lengths)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        ids = np.full((len(examples), width), self.special_ids["pad"], dtype=np.int64)
        types = np.zeros((len(examples), width), dtype=np.int64)
        mask = np.zeros((len(examples), width), dtype=np.int64)
        for row, (e, n) in enumerate(zip(examples, lengths)):
            ids[row, :n] = e["input_ids"]
            types[row, :n] = e["token_type_ids"]
            mask[row, :n] = 1
            if self.document_attention and int(e["next_sentence_label"]) == NSP_IGNORE:
                # Document k (from 1) holds the tokens after the (k-1)-th [SEP] up to and including the k-th.
                seps = ids[row, :n] == self.special_ids["sep"]
                mask[row, 1:n] += np.cumsum(seps[:-1])
        return ids, types, mask

    def _maskable(self, ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        return (attention_mask > 0) & ~np.isin(ids, self._special)

    def _select(self, ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        maskable = self._maskable(ids, attention_mask)
        n_maskable = maskable.sum(axis=1)
        # Exactly round(p * n) per sequence (as the reference does) rather than independent coin flips: the
        # number of predictions per sequence then has no variance to confuse the loss curves.
        budget = np.where(n_maskable > 0, np.maximum(1, np.rint(n_maskable * self.mask_prob)), 0).astype(np.int64)
        if self.whole_word_mask:
            return self._select_words(ids, maskable, budget)
        scores = self.rng.random(ids.shape)
        scores[~maskable] = np.inf
        ranks = np.argsort(np.argsort(scores, axis=1, kind="stable"), axis=1, kind="stable")
        return ranks < budget[:, None]

    def _select_words(self, ids: np.ndarray, maskable: np.ndarray, budget: np.ndarray) -> np.ndarray:
        cont = self.is_continuation[np.clip(ids, 0, len(self.is_continuation) - 1)] & maskable
        # A word starts at every maskable token that is not a continuation piece (or follows a special token).
        starts = maskable & ~(cont & np.concatenate([np.zeros_like(maskable[:, :1]), maskable[:, :-1]], axis=1))
        selected = np.zeros_like(maskable)
        for row in range(ids.shape[0]):
            word_start = np.flatnonzero(starts[row])
            if budget[row] == 0 or len(word_start) == 0:
                continue
            word_of = np.cumsum(starts[row]) - 1  # word index of each position (valid where maskable)
            word_len = np.bincount(word_of[maskable[row]], minlength=len(word_start))
            chosen = self._greedy_words(word_len, int(budget[row]))
            selected[row] = maskable[row] & chosen[np.maximum(word_of, 0)]
        return selected

    def _greedy_words(self, word_len: np.ndarray, budget: int) -> np.ndarray:
        """Words in random order, each taken if it still fits the budget (the reference's skip-and-continue)."""
        chosen = np.zeros(len(word_len), dtype=bool)
        total = 0
        for w in self.rng.permutation(len(word_len)).tolist():
            if total >= budget:
                break
            if total + word_len[w] <= budget:
                chosen[w] = True
                total += int(word_len[w])
        if total == 0:  # every word is longer than the budget: take the shortest, never zero predictions
            chosen[int(np.argmin(word_len))] = True
        return chosen

    def _corrupt(self, ids: np.ndarray, selected: np.ndarray) -> None:
        rows, cols = np.nonzero(selected)
        u = self.rng.random(len(rows))
        to_mask = u < 0.8
        to_random = (u >= 0.8) & (u < 0.9)
        ids[rows[to_mask], cols[to_mask]] = self.special_ids["mask"]
        replacement = self._random_pool[self.rng.integers(0, len(self._random_pool), int(to_random.sum()))]
        ids[rows[to_random], cols[to_random]] = replacement
