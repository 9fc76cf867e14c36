"""Pretraining step throughput: our BERT vs `transformers.BertForPreTraining`, side by side in one process.

Same config, same initial weights, same batches (B x T with real lengths uniform in [T/4, T], 15% masking, NSP),
a step = forward + backward + AdamW step (ours: fused AdamW where available; transformers: torch.optim.AdamW
defaults). Ours runs in the `--variants` asked for (varlen/padded attention, eager/compiled). Steps of all the
implementations are interleaved so that machine noise hits them alike. Prints the CPU and its bf16 capability;
precision `auto` resolves as training does (bf16 where the device computes it natively). Reports real
(non-padding) tokens/s, the ratio, and MFU against the peak for the dtype: on CPU this machine's measured matmul
rate, on a GPU the datasheet figure from `bertscale.model.flops` (or --peak-tflops). On CUDA every timed step is
bracketed by `torch.cuda.synchronize()`, since kernels run asynchronously.

    python bench/pretrain.py --size mini --steps 6
    python bench/pretrain.py --size base --steps 2 --warmup 1 --json base.json
    python bench/pretrain.py --size mini --variants varlen,varlen+compile,padded --precision bf16,fp32
    python bench/pretrain.py --device cuda --size base --batch 64 --precision bf16 --steps 20 \
        --variants varlen,varlen+compile,padded,padded+compile
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import cpu_line  # noqa: E402
from bertscale.hardware import resolve_precision  # noqa: E402
from bertscale.model import BertConfig, BertForPreTraining  # noqa: E402
from bertscale.model.bert import compile_dense_blocks  # noqa: E402
from bertscale.model.flops import measure_peak_flops, peak_flops, training_flops  # noqa: E402

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


VARIANTS = ("varlen", "varlen+compile", "padded", "padded+compile")


def build_models(config: BertConfig, variants: list[str]) -> tuple[dict[str, torch.nn.Module], torch.nn.Module]:
    """Our model in each variant (`varlen`: unpadded tokens and variable-length attention; `padded`: the plain
    [B, T] computation with a key mask; `+compile`: torch.compile of the dense blocks), all from the same initial
    weights, and transformers' model with those weights too."""
    import copy

    import transformers

    base = BertForPreTraining(config).train()
    ours = {}
    for name in variants:
        model = copy.deepcopy(base)
        model.config = copy.deepcopy(config)
        model.config.unpad = name.startswith("varlen")
        if name.endswith("+compile"):
            compile_dense_blocks(model)
        ours[name] = model
    hf = transformers.BertForPreTraining(transformers.BertConfig(**config.architecture())).train()
    hf.load_state_dict(base.state_dict(), strict=False)
    return ours, hf


def to_device(batch: Batch, device: torch.device) -> Batch:
    ours, hf = ({k: v.to(device) for k, v in d.items()} for d in (batch.ours, batch.hf))
    return Batch(ours, hf, batch.lengths, batch.num_masked)


def our_optimizer(model: torch.nn.Module) -> tuple[torch.optim.Optimizer, str]:
    """Fused AdamW (one kernel over all tensors) where this torch build supports it on the device, else foreach."""
    device = next(model.parameters()).device
    try:
        probe = torch.zeros(4, requires_grad=True, device=device)
        probe.grad = torch.ones(4, device=device)
        torch.optim.AdamW([probe], fused=True).step()  # unsupported fused kernels fail at step, not construction
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        return opt, "fused"
    except (RuntimeError, NotImplementedError):
        return torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True), "foreach"


def sync(device: torch.device) -> None:
    """Wait for queued kernels, so the clock measures work done rather than work launched."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, inputs: dict, bf16: bool,
               device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with ctx:
        out = model(**inputs)
    loss = out.loss if hasattr(out, "loss") else out[0]
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    sync(device)
    return time.perf_counter() - start


def run_precision(config: BertConfig, batches: list[Batch], precision: str, peak: float | None, args) -> dict:
    """Warm up every model (compiling where asked), then alternate timed steps: each variant of ours, then
    transformers, and again."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    ours, hf = build_models(config, args.variants)
    hf = hf.to(device)
    runs = {}
    kind = None
    for name, model in ours.items():
        model.to(device)
        opt, kind = our_optimizer(model)
        runs[name] = (model, opt, "ours")
    runs["transformers"] = (hf, torch.optim.AdamW(hf.parameters(), lr=1e-4), "hf")
    bf16 = precision == "bf16"
    for i in range(args.warmup):
        b = batches[i % len(batches)]
        for model, opt, fmt in runs.values():
            train_step(model, opt, getattr(b, fmt), bf16, device)
    seconds = dict.fromkeys(runs, 0.0)
    tokens = flops = 0.0
    for i in range(args.steps):
        b = batches[i % len(batches)]
        for name, (model, opt, fmt) in runs.items():
            seconds[name] += train_step(model, opt, getattr(b, fmt), bf16, device)
        tokens += sum(b.lengths)
        flops += training_flops(config, b.lengths, b.num_masked)
    result = {"precision": precision, "device": str(device), "optimizer_ours": kind,
              "transformers_attention": getattr(hf.config, "_attn_implementation", None),
              "peak_gflops": peak / 1e9 if peak else None, "real_tokens": tokens, "impls": list(runs)}
    for name, s in seconds.items():
        result[name] = {"seconds": s, "tokens_per_s": tokens / s, "mfu": flops / s / peak if peak else None,
                        "ratio": seconds["transformers"] / s}
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="mini", help="Named size: tiny, mini, small, medium, base, large.")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--vocab", type=int, default=30522)
    p.add_argument("--precision", default="auto", help="Comma-separated: auto, bf16, fp32 (auto: bf16 where the "
                   "device computes it natively, else fp32).")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=6, help="Timed steps per implementation.")
    p.add_argument("--threads", type=int, default=None, help="torch threads; default: torch's choice.")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="Where both models train.")
    p.add_argument("--peak-tflops", type=float, help="Peak TFLOP/s for MFU; default: measured (CPU) or the "
                   "GPU's datasheet figure.")
    p.add_argument("--variants", default="varlen",
                   help=f"Comma-separated variants of ours, each timed against transformers: {', '.join(VARIANTS)}.")
    p.add_argument("--attention", default="auto", choices=["auto", "flash", "sdpa"],
                   help="Our attention kernel for the varlen variants (flash needs CUDA and flash-attn).")
    p.add_argument("--json", help="Also write the results to this file.")
    args = p.parse_args()
    args.variants = args.variants.split(",")
    if unknown := set(args.variants) - set(VARIANTS):
        p.error(f"unknown variants {sorted(unknown)}: choose from {', '.join(VARIANTS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible to torch")
    config = BertConfig.from_name(args.size, vocab_size=args.vocab, max_position_embeddings=max(512, args.seq),
                                  attention=args.attention)
    g = torch.Generator().manual_seed(1234)
    batches = [to_device(make_batch(g, args.batch, args.seq, args.vocab, 0.15), torch.device(args.device))
               for _ in range(4)]
    precisions = [resolve_precision(prec, args.device).name for prec in args.precision.split(",")]
    peaks = {prec: bench_peak(prec, args) for prec in precisions}
    results = [run_precision(config, batches, prec, peaks[prec], args) for prec in precisions]
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu threads={torch.get_num_threads()}"
    print(cpu_line())
    print(f"size={args.size} L{config.num_hidden_layers}/H{config.hidden_size} B={args.batch} T<={args.seq} "
          f"{where} steps={args.steps} (warmup {args.warmup}) attention={args.attention}")
    print(f"{'precision':<10}{'impl':<16}{'real tok/s':>12}{'MFU':>8}{'vs HF':>8}   peak GFLOP/s")
    for r in results:
        for name in r["impls"]:
            mfu = f"{r[name]['mfu']:>8.1%}" if r[name]["mfu"] is not None else f"{'n/a':>8}"
            peak = f"{r['peak_gflops']:.0f}" if r["peak_gflops"] else "unknown (--peak-tflops)"
            print(f"{r['precision']:<10}{name:<16}{r[name]['tokens_per_s']:>12,.0f}{mfu}{r[name]['ratio']:>7.2f}x   "
                  f"{peak}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"size": args.size, "config": config.to_dict(), "device": args.device, "cpu": cpu_line(),
                       "threads": torch.get_num_threads(),
                       "batch": args.batch, "seq": args.seq, "results": results}, f, indent=2)


def bench_peak(precision: str, args) -> float | None:
    """Peak FLOP/s for MFU: --peak-tflops, the GPU's table figure, or this CPU's measured matmul rate (measured
    first, on an idle process: after the runs it would include leftover load and allocator state)."""
    if args.peak_tflops:
        return args.peak_tflops * 1e12
    if args.device == "cuda":
        return peak_flops(torch.device("cuda"), precision)
    return measure_peak_flops(torch.bfloat16 if precision == "bf16" else torch.float32, seconds=2.0)


if __name__ == "__main__":
    main()
