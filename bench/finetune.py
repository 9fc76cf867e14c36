"""Fine-tuning side by side: bertscale's loop vs `transformers.Trainer` on the same HF-format checkpoint, task,
hyper-parameters and seeds, in one process.

The checkpoint is `--checkpoint DIR` (any HF-format BERT with its tokenizer files, e.g. `<workdir>/train/hf` of
a pretraining run), or else a random-init `transformers.BertForPreTraining` (saved with `save_pretrained`,
safetensors) with a WordPiece vocabulary trained on the task's training subset; both sides start from identical
weights. Both evaluate every epoch and report their best epoch's dev metric. Precision `auto` resolves as the
product does (bf16 on CPUs with AMX/AVX-512 BF16 and bf16 GPUs, else fp32) and both sides use the result. Prints
the CPU and its bf16 capability and a table; `--json out.json` saves it.

    .venv/bin/python bench/finetune.py --glue-dir ../shared/data/glue --task SST-2 --seeds 1 2 3 4 5
    .venv/bin/python bench/finetune.py --checkpoint runs/quality/train/hf --task CoLA --train-examples 8551 \
        --lr 1e-4 --seeds 1 2 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import cpu_line  # noqa: E402
from bertscale.config import TokenizerConfig  # noqa: E402
from bertscale.finetune import finetune_task, get_task, load_eval, load_train  # noqa: E402
from bertscale.finetune.metrics import compute  # noqa: E402
from bertscale.finetune.tasks import Hparams, TaskSpec, subset  # noqa: E402
from bertscale.hardware import resolve_precision  # noqa: E402
from bertscale.tokenizer import save_tokenizer, train_wordpiece  # noqa: E402

SIZES = {"tiny": (2, 128, 2, 512), "mini": (4, 256, 4, 1024)}


def make_checkpoint(task: TaskSpec, glue: Path, n_train: int, size: str, out: Path) -> Path:
    import transformers

    ds = subset(load_train(task, glue).dataset, n_train)
    texts = [t for a, b in zip(ds["text_a"], ds["text_b"]) for t in (a, b) if t]
    vocab = save_tokenizer(train_wordpiece(TokenizerConfig(vocab_size=4000, min_frequency=1), iter([texts])),
                           out).vocab_size
    layers, hidden, heads, ffn = SIZES[size]
    config = transformers.BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                                     num_attention_heads=heads, intermediate_size=ffn, max_position_embeddings=512)
    torch.manual_seed(0)
    transformers.BertForPreTraining(config).save_pretrained(out, safe_serialization=True)
    return out


def run_ours(task: TaskSpec, ckpt: Path, glue: Path, hp: Hparams, seed: int, n_train: int, precision: str,
             compile: bool | str = "auto") -> dict:
    start = time.perf_counter()
    r = finetune_task(task, ckpt, ckpt, hp, seed, data_dir=glue, max_train_examples=n_train, precision=precision,
                      predict_test=False, compile=compile)
    return {"score": r.score, "wall_s": time.perf_counter() - start, "best_epoch": r.best_epoch}


def _hf_split(split, tok, max_length: int):
    a, b, labels = list(split["text_a"]), list(split["text_b"]), list(split["label"])
    enc = tok(a, b if b[0] is not None else None, truncation=True, max_length=max_length)
    return [{**{k: enc[k][i] for k in enc}, "labels": labels[i]} for i in range(len(a))]


def run_trainer(task: TaskSpec, ckpt: Path, glue: Path, hp: Hparams, seed: int, n_train: int, precision: str) -> dict:
    import transformers

    start = time.perf_counter()
    tok = transformers.AutoTokenizer.from_pretrained(ckpt)
    train = _hf_split(subset(load_train(task, glue).dataset, n_train), tok, hp.max_length)
    dev = _hf_split(load_eval(task, glue)[0].dataset, tok, hp.max_length)
    model = transformers.BertForSequenceClassification.from_pretrained(ckpt, num_labels=task.num_labels)

    def metrics(pred) -> dict:
        preds = pred.predictions.squeeze(-1) if task.kind == "regression" else pred.predictions.argmax(-1)
        return compute(task.metrics, pred.label_ids, preds)

    with tempfile.TemporaryDirectory() as out:
        args = transformers.TrainingArguments(
            output_dir=out, per_device_train_batch_size=hp.batch_size, per_device_eval_batch_size=64,
            learning_rate=hp.lr, num_train_epochs=hp.epochs, warmup_steps=hp.warmup_ratio,
            weight_decay=hp.weight_decay, adam_epsilon=1e-6, eval_strategy="epoch", save_strategy="no",
            logging_strategy="no", seed=seed, use_cpu=not torch.cuda.is_available(), bf16=precision == "bf16",
            report_to=[], disable_tqdm=True, dataloader_num_workers=0)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=train, eval_dataset=dev,
                                       data_collator=transformers.DataCollatorWithPadding(tok),
                                       compute_metrics=metrics)
        trainer.train()
    scores = [h["eval_score"] for h in trainer.state.log_history if "eval_score" in h]
    return {"score": max(scores), "wall_s": time.perf_counter() - start, "best_epoch": int(np.argmax(scores)) + 1}


def warm_imports() -> None:
    """Import both sides' lazily loaded modules before any clock starts: the first timed run of either side would
    otherwise pay for them (transformers resolves `Trainer` & co. on first attribute access)."""
    import transformers

    for name in ("Trainer", "TrainingArguments", "DataCollatorWithPadding", "AutoTokenizer",
                 "BertForSequenceClassification"):
        getattr(transformers, name)
    import bertscale.model.hf  # noqa: F401


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_glue = Path(os.environ.get("BERTSCALE_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" /
                                       "data")) / "glue"
    p.add_argument("--glue-dir", type=Path, default=default_glue)
    p.add_argument("--task", default="SST-2")
    p.add_argument("--train-examples", type=int, default=2000)
    p.add_argument("--size", choices=list(SIZES), default="tiny")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--epochs", type=float, default=3)
    p.add_argument("--max-length", type=int, default=128)
    # Random-init tiny models vary by several points between seeds: compare medians over several.
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    p.add_argument("--checkpoint", type=Path, help="HF-format BERT dir with tokenizer files; default: random init.")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    p.add_argument("--compile", choices=["auto", "true", "false"], default="auto", help="Ours: finetune.compile.")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    chosen = resolve_precision(args.precision, "cuda" if torch.cuda.is_available() else "cpu")
    args.precision = chosen.name
    compile = {"true": True, "false": False}.get(args.compile, "auto")
    print(f"{cpu_line()}; precision {chosen.name} ({chosen.reason})", flush=True)
    task = get_task(args.task)
    hp = Hparams(lr=args.lr, batch_size=args.batch_size, epochs=args.epochs, max_length=args.max_length)
    warm_imports()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.checkpoint or make_checkpoint(task, args.glue_dir, args.train_examples, args.size,
                                                  Path(tmp) / "ckpt")
        rows = {"bertscale": [], "transformers.Trainer": []}
        for seed in args.seeds:  # interleaved, so that machine load drifts hit both sides alike
            rows["bertscale"].append(run_ours(task, ckpt, args.glue_dir, hp, seed, args.train_examples, args.precision,
                                              compile))
            rows["transformers.Trainer"].append(run_trainer(task, ckpt, args.glue_dir, hp, seed, args.train_examples,
                                                            args.precision))
    report(args, rows)


def report(args: argparse.Namespace, rows: dict[str, list[dict]]) -> None:
    summary = {name: {"dev_score_median": statistics.median(r["score"] for r in runs) * 100,
                      "wall_s_total": sum(r["wall_s"] for r in runs), "runs": runs} for name, runs in rows.items()}
    ours, ref = summary["bertscale"], summary["transformers.Trainer"]
    model = args.checkpoint or f"{args.size} random-init BERT"
    print(f"\n{cpu_line()}\n{args.task}: {args.train_examples} train examples, {model}, lr {args.lr:g}, "
          f"batch {args.batch_size}, {args.epochs:g} epochs, seeds {args.seeds}, {args.precision}, "
          f"{args.threads} thread(s)\n")
    print(f"| {'':22} | dev score (median) | wall s (all seeds) |")
    print(f"|{'-' * 24}|{'-' * 20}|{'-' * 20}|")
    for name, s in summary.items():
        print(f"| {name:22} | {s['dev_score_median']:18.2f} | {s['wall_s_total']:18.1f} |")
    delta = ours["dev_score_median"] - ref["dev_score_median"]
    ratio = ours["wall_s_total"] / ref["wall_s_total"]
    print(f"\nscore difference (ours - Trainer): {delta:+.2f} points; wall time ratio (ours / Trainer): {ratio:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"config": {k: str(v) for k, v in vars(args).items()}, "results": summary,
                                         "score_delta_points": delta, "wall_ratio": ratio}, indent=2))


if __name__ == "__main__":
    main()
