"""Attention over unpadded tokens, confined to each sequence (or each document of a packed sequence).

The encoder runs on the real tokens of a batch only, as one [N, C] matrix; attention is the one operation that
needs to know where each sequence starts and ends. `Segments` holds that once per batch (`cu_seqlens`, as
FlashAttention names it), and `varlen_attention` runs it with one of two kernels:

- `flash`: FlashAttention-2's variable-length kernel (`flash_attn_varlen_qkvpacked_func`) on CUDA in bf16/fp16,
  when the optional `flash-attn` package is installed. No padding anywhere, dropout inside the kernel.
- `sdpa`: `scaled_dot_product_attention` over length buckets. Segments are sorted by length and cut into a few
  buckets; each bucket is padded only to its own longest segment, so the attention work (and its dropout, whose
  random numbers cost more than the products on a CPU) follows sum(L^2) of the real lengths instead of
  batch x max(L)^2. Runs on any device. (Measured on CPU with torch 2.13: `scaled_dot_product_attention` on
  nested jagged tensors has no CPU kernel ("No viable backend"), and FlexAttention has no CPU backward, so
  neither can train on a CPU.)

A segment is a run of tokens with the same value in the attention mask of one row: 0 is padding, and packed
sequences number their documents 1, 2, ... so that no token attends across a document boundary.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from bertscale.model.dropout import dropout

BACKENDS = ("auto", "flash", "sdpa")
MAX_BUCKETS = 4  # SDPA calls per layer: more cut padding further, each costs a kernel launch and a gather
BUCKET_TOKENS = 32  # one bucket per this many tokens of the longest segment: short batches (fine-tuning on
# single sentences) gain nothing from bucketing and pay its per-call cost (measured: 38 vs 45 ms a step)


@dataclass
class Bucket:
    """Segments of similar length, padded to `length`: `gather` picks [S_b * length] rows of the [N+1] tokens
    (row N is a zero row, for padding), `valid` the rows of that grid that hold real tokens, in token order of
    the bucket's segments."""

    gather: Tensor
    valid: Tensor
    key_mask: Tensor | None  # [S_b, 1, 1, length], None when every segment of the bucket has that length
    count: int
    length: int


@dataclass
class Segments:
    cu_seqlens: Tensor  # int32 [S+1]: segment s is tokens cu_seqlens[s]:cu_seqlens[s+1] of the packed rows
    max_seqlen: int
    buckets: list[Bucket]
    restore: Tensor  # [N]: row of each token in the concatenated outputs of the buckets

    @classmethod
    def from_lengths(cls, lengths: Tensor, max_buckets: int | None = None) -> "Segments":
        """Segments of the given lengths, laid out back to back (the packed token order), in at most
        `max_buckets` length buckets (default: one per BUCKET_TOKENS of the longest, at most MAX_BUCKETS)."""
        device = lengths.device
        lengths = lengths.long()
        n = int(lengths.sum())
        cu = torch.zeros(len(lengths) + 1, dtype=torch.int32, device=device)
        cu[1:] = lengths.cumsum(0)
        max_len = int(lengths.max())
        max_buckets = max_buckets or max(1, min(MAX_BUCKETS, max_len // BUCKET_TOKENS))
        order = torch.sort(lengths, descending=True, stable=True).indices
        buckets, placed = [], []
        for chunk in order.tensor_split(min(max_buckets, len(lengths))):
            if len(chunk) == 0:
                continue
            lens = lengths[chunk]
            length = int(lens.max())
            pos = torch.arange(length, device=device)
            real = pos[None, :] < lens[:, None]  # [S_b, length]
            tokens = cu[chunk].long()[:, None] + pos[None, :]
            gather = torch.where(real, tokens, torch.full_like(tokens, n)).flatten()
            valid = real.flatten().nonzero().squeeze(1)
            key_mask = None if bool(real.all()) else real[:, None, None, :]
            buckets.append(Bucket(gather, valid, key_mask, len(chunk), length))
            placed.append(gather.index_select(0, valid))
        concat = torch.cat(placed)  # token index of each output row, bucket by bucket
        restore = torch.empty_like(concat)
        restore[concat] = torch.arange(n, device=device)
        return cls(cu, max_len, buckets, restore)


def flash_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def choose_backend(requested: str, qkv: Tensor) -> str:
    """`flash` where it can run (CUDA, half precision, the package installed), else `sdpa`."""
    if requested not in BACKENDS:
        raise ValueError(f"attention backend {requested!r}: use one of {', '.join(BACKENDS)}")
    usable = qkv.is_cuda and qkv.dtype in (torch.float16, torch.bfloat16) and flash_available()
    if requested == "flash" and not usable:
        raise RuntimeError("attention=flash needs the flash-attn package, a CUDA device and bf16/fp16 activations "
                           "(pip install 'bertscale[flash]'); use attention=auto to fall back to sdpa")
    return "flash" if requested == "flash" or (requested == "auto" and usable) else "sdpa"


def attend(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None, dropout_p: float) -> Tensor:
    """`scaled_dot_product_attention`; with dropout on a CPU, where it runs the unfused math path anyway, the same
    math with the cheaper dropout mask of `bertscale.model.dropout`."""
    if dropout_p == 0.0 or q.device.type != "cpu" or torch.compiler.is_compiling():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, dropout_p=dropout_p)
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask, float("-inf"))
    return dropout(scores.softmax(-1), dropout_p) @ v


def varlen_attention(qkv: Tensor, segments: Segments, dropout_p: float, backend: str = "auto") -> Tensor:
    """Attention of packed tokens within their segments: qkv [N, 3, heads, head_dim] -> [N, heads * head_dim]."""
    n, _, heads, dim = qkv.shape
    if choose_backend(backend, qkv) == "flash":
        from flash_attn import flash_attn_varlen_qkvpacked_func

        out = flash_attn_varlen_qkvpacked_func(qkv, segments.cu_seqlens, segments.max_seqlen, dropout_p)
        return out.reshape(n, heads * dim)
    rows = torch.cat([qkv, qkv.new_zeros(1, 3, heads, dim)])
    outs = []
    for b in segments.buckets:
        q, k, v = rows.index_select(0, b.gather).view(b.count, b.length, 3, heads, dim).permute(2, 0, 3, 1, 4)
        out = attend(q, k, v, b.key_mask, dropout_p)
        outs.append(out.transpose(1, 2).reshape(b.count * b.length, heads * dim).index_select(0, b.valid))
    return torch.cat(outs).index_select(0, segments.restore)
