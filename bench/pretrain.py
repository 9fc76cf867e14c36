"""Pretraining step throughput: our BERT vs `transformers.BertForPreTraining`, side by side in one process.

Same config, same initial weights, same batches (B x T with real lengths uniform in [T/4, T], 15% masking, NSP),
a step = forward + backward + AdamW step (ours: fused AdamW where available; transformers: torch.optim.AdamW
defaults). Steps of the two implementations are interleaved so that machine noise hits both alike. Reports real
(non-padding) tokens/s, the ratio, and MFU against this machine's measured matmul peak for the dtype.

    python bench/pretrain.py --size mini --steps 6
    python bench/pretrain.py --size base --steps 2 --warmup 1 --json base.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from dataclasses import dataclass

import torch

from bertscale.model import BertConfig, BertForPreTraining
from bertscale.model.flops import measure_peak_flops, training_flops

CLS, SEP, MASK = 101, 102, 103


@dataclass
class Batch:
    ours: dict[str, torch.Tensor]
    hf: dict[str, torch.Tensor]
    lengths: list[int]
    num_masked: int


def make_batch(g: torch.Generator, batch: int, seq: int, vocab: int, mask_prob: float) -> Batch:
    """A realistic padded NSP batch in both input formats: ours (masked positions) and HF's (label grid)."""
    lengths = torch.randint(seq // 4, seq + 1, (batch,), generator=g)
    t = int(lengths.max())
    pos = torch.arange(t)[None]
    mask = (pos < lengths[:, None]).long()
    ids = torch.randint(1000, vocab, (batch, t), generator=g) * mask
    ids[:, 0] = CLS
    ids[torch.arange(batch), lengths - 1] = SEP
    types = ((pos >= lengths[:, None] // 2) & mask.bool()).long()
    maskable = (mask.bool() & (ids != CLS) & (ids != SEP)).flatten().nonzero().squeeze(1)
    chosen = maskable[torch.rand(len(maskable), generator=g) < mask_prob]
    labels = ids.flatten()[chosen]
    inputs = ids.flatten().clone()
    inputs[chosen] = MASK
    inputs = inputs.view(batch, t)
    nsp = torch.randint(0, 2, (batch,), generator=g)
    grid = torch.full((batch * t,), -100)
    grid[chosen] = labels
    ours = dict(input_ids=inputs, token_type_ids=types, attention_mask=mask, masked_positions=chosen,
                masked_labels=labels, next_sentence_label=nsp)
    hf = dict(input_ids=inputs, token_type_ids=types, attention_mask=mask, labels=grid.view(batch, t),
              next_sentence_label=nsp)
    return Batch(ours, hf, lengths.tolist(), len(chosen))


def build_models(config: BertConfig) -> tuple[torch.nn.Module, torch.nn.Module]:
    import transformers

    ours = BertForPreTraining(config).train()
    fields = {k: v for k, v in config.to_dict().items() if k != "unpad"}
    hf = transformers.BertForPreTraining(transformers.BertConfig(**fields)).train()
    hf.load_state_dict(ours.state_dict(), strict=False)
    return ours, hf


def our_optimizer(model: torch.nn.Module) -> tuple[torch.optim.Optimizer, str]:
    """Fused AdamW (one kernel over all tensors) where this torch build supports it on CPU, else foreach."""
    try:
        probe = torch.zeros(4, requires_grad=True)
        probe.grad = torch.ones(4)
        torch.optim.AdamW([probe], fused=True).step()  # unsupported fused kernels fail at step, not construction
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        return opt, "fused"
    except (RuntimeError, NotImplementedError):
        return torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True), "foreach"


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, inputs: dict, bf16: bool) -> float:
    start = time.perf_counter()
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with ctx:
        out = model(**inputs)
    loss = out.loss if hasattr(out, "loss") else out[0]
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def run_precision(config: BertConfig, batches: list[Batch], precision: str, peak: float, args) -> dict:
    """Warm up both, then alternate timed steps: ours, transformers, ours, ..."""
    torch.manual_seed(0)
    ours, hf = build_models(config)
    opt_ours, kind = our_optimizer(ours)
    opt_hf = torch.optim.AdamW(hf.parameters(), lr=1e-4)
    bf16 = precision == "bf16"
    for i in range(args.warmup):
        b = batches[i % len(batches)]
        train_step(ours, opt_ours, b.ours, bf16)
        train_step(hf, opt_hf, b.hf, bf16)
    seconds = {"ours": 0.0, "transformers": 0.0}
    tokens = flops = 0.0
    for i in range(args.steps):
        b = batches[i % len(batches)]
        seconds["ours"] += train_step(ours, opt_ours, b.ours, bf16)
        seconds["transformers"] += train_step(hf, opt_hf, b.hf, bf16)
        tokens += sum(b.lengths)
        flops += training_flops(config, b.lengths, b.num_masked)
    result = {"precision": precision, "optimizer_ours": kind, "peak_gflops": peak / 1e9, "real_tokens": tokens}
    for name, s in seconds.items():
        result[name] = {"seconds": s, "tokens_per_s": tokens / s, "mfu": flops / s / peak}
    result["ratio"] = result["ours"]["tokens_per_s"] / result["transformers"]["tokens_per_s"]
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="mini", help="Named size: tiny, mini, small, medium, base, large.")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--vocab", type=int, default=30522)
    p.add_argument("--precision", default="bf16,fp32", help="Comma-separated: bf16, fp32.")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=6, help="Timed steps per implementation.")
    p.add_argument("--threads", type=int, default=None, help="torch threads; default: torch's choice.")
    p.add_argument("--json", help="Also write the results to this file.")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = BertConfig.from_name(args.size, vocab_size=args.vocab, max_position_embeddings=max(512, args.seq))
    g = torch.Generator().manual_seed(1234)
    batches = [make_batch(g, args.batch, args.seq, args.vocab, 0.15) for _ in range(4)]
    precisions = args.precision.split(",")
    # Peaks first, on an idle process: measured after the runs they would include leftover load and allocator state.
    peaks = {prec: measure_peak_flops(torch.bfloat16 if prec == "bf16" else torch.float32, seconds=2.0)
             for prec in precisions}
    results = [run_precision(config, batches, prec, peaks[prec], args) for prec in precisions]
    print(f"size={args.size} L{config.num_hidden_layers}/H{config.hidden_size} B={args.batch} T<={args.seq} "
          f"threads={torch.get_num_threads()} steps={args.steps} (warmup {args.warmup})")
    print(f"{'precision':<10}{'impl':<14}{'real tok/s':>12}{'MFU':>8}   peak GFLOP/s")
    for r in results:
        for name in ("ours", "transformers"):
            print(f"{r['precision']:<10}{name:<14}{r[name]['tokens_per_s']:>12,.0f}{r[name]['mfu']:>8.1%}   "
                  f"{r['peak_gflops']:.0f}")
        print(f"{r['precision']:<10}{'ratio':<14}{r['ratio']:>11.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"size": args.size, "config": config.to_dict(), "threads": torch.get_num_threads(),
                       "batch": args.batch, "seq": args.seq, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
