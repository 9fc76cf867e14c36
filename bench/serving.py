"""How a registered classifier is best served: bertscale's own pyfunc (what the registry logs) against the
transformers text-classification pipeline that the `mlflow.transformers` flavor would run, on the same fine-tuned
HF-format model dir, side by side in one run.

For each: the installed size of what it needs beyond the product's own dependencies, the time a fresh Python
process takes to import and load the model, and predict latency (median of `--repeats` calls) for one row and for
a batch of 32 rows. The predictions of both are compared (labels must agree).

    python bench/serving.py --model-dir runs/demo/finetune/RTE/.../model [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_facts, cpu_line  # noqa: E402

LOAD = {
    "bertscale pyfunc": (
        "from pathlib import Path\n"
        "from bertscale.serving import BertscaleModel\n"
        "m = BertscaleModel().load(Path({d!r}))\n"
    ),
    "transformers pipeline": (
        "from transformers import pipeline\n"
        "m = pipeline('text-classification', model={d!r}, tokenizer={d!r}, device='cpu')\n"
    ),
}


def _site_size(package: str) -> float:
    """MiB on disk of an installed distribution's files."""
    from importlib import metadata

    dist = metadata.distribution(package)
    return sum((Path(dist.locate_file(f)).stat().st_size for f in dist.files or []
                if Path(dist.locate_file(f)).is_file()), 0) / 2**20


def load_seconds(code: str, repeats: int = 3) -> float:
    """Median wall time of a fresh interpreter that imports and loads (the interpreter's own start excluded)."""
    base = _fresh("pass", repeats)
    return _fresh(code, repeats) - base


def _fresh(code: str, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def latency(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", required=True, help="A fine-tuned classifier dir (bertscale_finetune.json inside)")
    ap.add_argument("--repeats", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", help="Write the results here")
    args = ap.parse_args()

    import pandas as pd
    import torch
    from transformers import pipeline

    from bertscale.serving import BertscaleModel

    torch.set_num_threads(args.threads)
    cpu = cpu_facts()
    print(cpu_line(cpu))
    d = str(Path(args.model_dir).resolve())
    texts = [f"The film was {w} and the acting {v}." for w, v in
             zip(["great", "dull", "long", "fine"] * 8, ["superb", "flat", "honest", "wooden"] * 8)]
    ours = BertscaleModel().load(Path(d))
    theirs = pipeline("text-classification", model=d, tokenizer=d, device="cpu")
    labels = json.loads((Path(d) / "bertscale_finetune.json").read_text())["labels"]
    a = ours.predict(None, pd.DataFrame({"text": texts}))["label"].tolist()
    b = [labels[int(r["label"].split("_")[-1])] for r in theirs(texts)]
    agree = sum(x == y for x, y in zip(a, b)) / len(a)

    results = {"cpu": cpu, "model_dir": d, "labels_agree": agree, "variants": {}}
    extra = {"bertscale pyfunc": 0.0,
             "transformers pipeline": sum(_site_size(p) for p in ("transformers", "regex"))}
    calls = {"bertscale pyfunc": (lambda rows: ours.predict(None, pd.DataFrame({"text": rows}))),
             "transformers pipeline": (lambda rows: theirs(rows, batch_size=32))}
    for name, code in LOAD.items():
        row = {"extra_install_mib": round(extra[name], 1),
               "load_seconds": round(load_seconds(code.format(d=d)), 3),
               "predict_one_ms": round(latency(lambda: calls[name](texts[:1]), args.repeats) * 1000, 2),
               "predict_32_ms": round(latency(lambda: calls[name](texts), max(10, args.repeats // 10)) * 1000, 2)}
        results["variants"][name] = row
    print(f"labels agree on {agree:.0%} of {len(texts)} rows")
    print(f"{'':24}{'extra MiB':>10}{'load s':>9}{'1 row ms':>10}{'32 rows ms':>12}")
    for name, r in results["variants"].items():
        print(f"{name:24}{r['extra_install_mib']:>10}{r['load_seconds']:>9}{r['predict_one_ms']:>10}"
              f"{r['predict_32_ms']:>12}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
