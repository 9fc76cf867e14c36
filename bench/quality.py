"""Does our pretraining make a better model? Pretrain with a time budget, then fine-tune on GLUE from the
pretrained encoder and from a random initialisation of the same architecture, with the same fine-tuning budget.

1. corpus -> tokenizer -> pretraining data on the shared Wikipedia extract and Gutenberg texts, then
   `bertscale pretrain` with `train.max_minutes` (default 60: the run stops at the budget with a final checkpoint
   and the HF export). The schedule's decay is sized from `--steps-per-minute` so that it ends near the budget.
2. A random-init BERT of the same size, with the same tokenizer, exported in the HF layout.
3. `bertscale finetune` of both on the GLUE tasks found under --glue-dir (SST-2 subsampled), 3 seeds each, same
   hyper-parameters. Prints per-task medians, the mean for both, and the pretraining's held-out MLM curve.

Everything runs through the CLI, as a user would; each stage's log is kept under <workdir>/logs/.

    python bench/quality.py                         # 60 minutes of pretraining on this machine
    python bench/quality.py --minutes 240 --size base --steps-per-minute 400   # on a GPU
    python bench/quality.py --minutes 2 --tasks RTE --seeds 1 --workdir runs/quality-smoke   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from bench.common import cpu_line  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
TASKS = ["CoLA", "SST-2", "MRPC", "STS-B", "RTE"]  # QNLI has no train split in ../shared; WNLI: see --help
EVAL_LINE = re.compile(r"step (\d+) eval: (.*)")


def pipeline_config(args: argparse.Namespace, workdir: Path) -> dict:
    """The YAML the stages run with: one place for every setting of the comparison."""
    return {
        "name": "quality", "workdir": str(workdir),
        "tracking": {"enabled": False},
        "corpus": {"inputs": [str(args.corpus / "wikipedia"), str(args.corpus / "gutenberg")],
                   "txt_mode": "blank_line", "filters": {"min_chars": 100, "min_words": 15},
                   "target_shard_bytes": 8 * 2**20},
        "tokenizer": {"vocab_size": args.vocab_size},
        "data": {"seq_lengths": [args.seq_len], "dupe_factor": args.dupe_factor},
        "model": {"size": args.size},
        "train": {"zero_stage": 0, "num_procs": 1, "precision": args.precision, "lr": args.lr,
                  "warmup_steps": args.warmup_steps, "max_steps": max(args.warmup_steps + 1,
                                                                      int(args.minutes * args.steps_per_minute)),
                  "max_minutes": args.minutes, "micro_batch_size": args.batch_size, "log_every": 50,
                  "eval_every": args.eval_every, "eval_batches": 20, "checkpoint_every": 1000,
                  "checkpoint_minutes": 15, "keep_checkpoints": 1},
        "finetune": {"glue_dir": str(args.glue_dir), "tasks": args.tasks, "seeds": args.seeds,
                     "lr": args.ft_lr, "batch_size": 32, "epochs": args.ft_epochs, "max_length": 128,
                     "max_train_examples": args.max_train_examples, "num_workers": args.ft_workers,
                     "precision": args.precision, "register_models": False, "predict_test": False},
    }


def run_stage(name: str, argv: list[str], logs: Path) -> float:
    """One CLI stage, its output kept in logs/<name>.log; exits with the log's tail if it fails."""
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{name}.log"
    start = time.perf_counter()
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {' '.join(argv)}", flush=True)
    with log.open("w") as f:
        rc = subprocess.run([sys.executable, "-m", "bertscale.cli", *argv], stdout=f, stderr=subprocess.STDOUT,
                            cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}).returncode
    seconds = time.perf_counter() - start
    if rc:
        sys.exit(f"{name} failed (exit {rc}); last lines of {log}:\n" + "".join(log.read_text().splitlines(True)[-30:]))
    print(f"[{time.strftime('%H:%M:%S')}] {name} done in {seconds / 60:.1f} min", flush=True)
    return seconds


def random_init(train_hf: Path, out: Path, seed: int) -> Path:
    """The pretrained model's architecture and tokenizer with BERT's random initialisation, in the HF layout."""
    import torch

    from bertscale.model import BertConfig, BertForPreTraining
    from bertscale.model.hf import export_hf
    from bertscale.model.weights import TOKENIZER_FILES

    config = BertConfig.from_dict(json.loads((train_hf / "config.json").read_text()))
    torch.manual_seed(seed)
    export_hf(BertForPreTraining(config), out)
    for name in TOKENIZER_FILES:
        if (train_hf / name).is_file():
            (out / name).write_bytes((train_hf / name).read_bytes())
    return out


def eval_curve(log: Path) -> list[dict]:
    """Held-out evaluations from the pretraining log: step, MLM loss and accuracy."""
    curve = []
    for step, rest in EVAL_LINE.findall(log.read_text()):
        values = dict(kv.split("=", 1) for kv in rest.split(", "))
        curve.append({"step": int(step), **{k: float(v) for k, v in values.items()}})
    return curve


def scores(finetune_dir: Path) -> dict[str, float]:
    return json.loads((finetune_dir / "results.json").read_text())["scores"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=60.0, help="Pretraining time budget (train.max_minutes).")
    p.add_argument("--steps-per-minute", type=float, default=100.0,
                   help="Expected optimizer steps per minute: sizes the LR decay to end near the budget.")
    p.add_argument("--size", default="mini", help="Model size (both arms).")
    p.add_argument("--precision", default="auto")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32, help="Pretraining micro batch.")
    p.add_argument("--lr", type=float, default=5e-4, help="Peak pretraining learning rate.")
    p.add_argument("--warmup-steps", type=int, default=300)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--vocab-size", type=int, default=16000)
    p.add_argument("--dupe-factor", type=int, default=2)
    p.add_argument("--corpus", type=Path, default=SHARED / "corpus", help="Folder with wikipedia/ and gutenberg/.")
    p.add_argument("--glue-dir", type=Path, default=SHARED / "glue")
    p.add_argument("--tasks", nargs="+", default=TASKS,
                   help="GLUE tasks (WNLI is left out by default: as in the BERT paper, no model beats its "
                        "majority class).")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--ft-lr", type=float, default=1e-4, help="Fine-tuning learning rate (both arms).")
    p.add_argument("--ft-epochs", type=float, default=3)
    p.add_argument("--max-train-examples", type=int, default=10000, help="Subsample larger training sets (SST-2).")
    p.add_argument("--ft-workers", type=int, default=2, help="Fine-tuning jobs in parallel.")
    p.add_argument("--workdir", type=Path, default=ROOT / "runs" / "quality")
    p.add_argument("--skip-pretraining", action="store_true", help="Reuse the pretrained model in --workdir.")
    p.add_argument("--json", type=Path, help="Also write the results here.")
    args = p.parse_args()
    args.tasks = [t for t in args.tasks if (args.glue_dir / t / "train.tsv").is_file()] or sys.exit(
        f"none of the tasks has a train.tsv under {args.glue_dir}")

    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "quality.yaml"
    config.write_text(yaml.safe_dump(pipeline_config(args, workdir), sort_keys=False))
    logs = workdir / "logs"
    print(cpu_line(), flush=True)
    seconds: dict[str, float] = {}
    if not args.skip_pretraining:
        for stage in ("corpus", "tokenizer", "data", "pretrain"):
            seconds[stage] = run_stage(stage, [stage, "-c", str(config)], logs)
    train_hf = workdir / "train" / "hf"
    train_result = json.loads((workdir / "train" / "train_result.json").read_text())
    arms = {"pretrained": train_hf, "random init": random_init(train_hf, workdir / "random-init", seed=0)}
    results = {}
    for arm, ckpt in arms.items():
        out = workdir / ("finetune-" + arm.replace(" ", "-"))
        seconds[f"finetune {arm}"] = run_stage(
            f"finetune-{arm.replace(' ', '-')}",
            ["finetune", "-c", str(config), "--checkpoint", str(ckpt), "-o", str(out)], logs)
        results[arm] = scores(out)

    curve = eval_curve(logs / "pretrain.log")
    print(f"\n{cpu_line()}; pretraining: {args.size}, {train_result['final_step']} steps "
          f"({train_result['stopped']}), {train_result['tokens_per_s']:,.0f} real tokens/s")
    print("\nheld-out MLM during pretraining")
    print(f"{'step':>7} {'mlm_loss':>9} {'mlm_acc':>8}")
    for point in curve:
        print(f"{point['step']:>7} {point.get('mlm_loss', float('nan')):>9.3f} {point.get('mlm_acc', float('nan')):>8.3f}")
    print(f"\nGLUE dev, median of {len(args.seeds)} seeds (x100)")
    print(f"{'task':<8}{'pretrained':>12}{'random init':>13}{'gain':>8}")
    for task in args.tasks:
        a, b = (results[arm].get(task) for arm in arms)
        if a is None or b is None:
            print(f"{task:<8}{'failed':>12}")
            continue
        print(f"{task:<8}{100 * a:>12.1f}{100 * b:>13.1f}{100 * (a - b):>+8.1f}")
    common = [t for t in args.tasks if all(t in results[arm] for arm in arms)]
    means = {arm: 100 * statistics.mean(results[arm][t] for t in common) for arm in arms} if common else {}
    if means:
        gain = means["pretrained"] - means["random init"]
        print(f"{'mean':<8}{means['pretrained']:>12.1f}{means['random init']:>13.1f}{gain:>+8.1f}")
        print(f"goal: pretrained beats random init on the mean by >= 5 points: {'met' if gain >= 5 else 'NOT met'}")
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_line(), "args": {k: str(v) for k, v in vars(args).items()},
                                         "seconds": seconds, "train_result": train_result, "curve": curve,
                                         "scores": results, "means": means}, indent=2))


if __name__ == "__main__":
    main()
