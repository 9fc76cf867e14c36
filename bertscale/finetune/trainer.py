"""The fine-tuning loop for one task and one seed: encode, train with evaluation every epoch, keep the best epoch.

Speed on CPU comes from four places, each cheap to reason about: examples are batched with others of similar
length (sorted within shuffled mega-batches), so dynamic padding pads little; the model drops padding tokens
internally (`BertConfig.unpad`); matmuls run under bf16 autocast; AdamW is torch's fused kernel where available.
The optimizer step can instead go through a DeepSpeed engine (`zero_stage`), built by the pretraining engine.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from bertscale.errors import ConfigError
from bertscale.finetune import metrics as M
from bertscale.finetune.tasks import Hparams, LoadedSplit, TaskSpec, get_task, load_eval, load_test, load_train, subset

if TYPE_CHECKING:
    import datasets
    from tokenizers import Tokenizer

    from bertscale.config import CustomTaskConfig

log = logging.getLogger(__name__)

FINETUNE_FILE = "bertscale_finetune.json"
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json",
                   "bertscale_tokenizer.json")


@dataclass
class Encoded:
    """A tokenized split: variable-length id lists plus labels (None for test splits)."""

    name: str
    idx: list[str]
    input_ids: list[list[int]]
    token_type_ids: list[list[int]]
    labels: np.ndarray | None

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def lengths(self) -> list[int]:
        return [len(x) for x in self.input_ids]


@dataclass
class EpochRecord:
    epoch: int
    step: int
    train_loss: float
    lr: float
    seconds: float
    eval: dict[str, dict[str, float]]  # eval split -> metrics
    selection: float  # what best-epoch selection compares: mean task score over the eval splits


@dataclass
class TaskResult:
    """What one (task, seed, hparams) run produced; plain data, so it crosses process boundaries."""

    task: str
    seed: int
    hparams: dict[str, Any]
    best_epoch: int
    metrics: dict[str, dict[str, float]]  # eval split -> metrics at the best epoch
    history: list[EpochRecord]
    loss_curve: list[tuple[int, float]]
    confusion: dict[str, list[list[int]]] = field(default_factory=dict)
    predictions: dict[str, str] = field(default_factory=dict)  # submission name -> file
    model_dir: str | None = None
    train_examples: int = 0
    skipped_rows: int = 0
    train_seconds: float = 0.0
    tokens_per_second: float = 0.0

    @property
    def score(self) -> float:
        return self.history[self.best_epoch - 1].selection if self.history else float("nan")


# ----------------------------------------------------------------------------------------------------------------
# Encoding and batching
# ----------------------------------------------------------------------------------------------------------------
def prepare_tokenizer(tok: "Tokenizer", max_length: int) -> "Tokenizer":
    """A copy that truncates pairs longest-first to max_length (specials included) and never pads."""
    from tokenizers import Tokenizer

    out = Tokenizer.from_str(tok.to_str())
    out.enable_truncation(max_length, strategy="longest_first")
    out.no_padding()
    return out


def encode_split(split: LoadedSplit | "datasets.Dataset", tok: "Tokenizer", name: str | None = None) -> Encoded:
    """`[CLS] A [SEP]` or `[CLS] A [SEP] B [SEP]` for every row, with BERT's token types."""
    ds = split.dataset if isinstance(split, LoadedSplit) else split
    a, b = ds["text_a"], ds["text_b"]
    inputs = [x if y is None else (x, y) for x, y in zip(a, b)]
    encodings = tok.encode_batch(inputs, add_special_tokens=True)
    labels = np.asarray(ds["label"]) if "label" in ds.column_names else None
    return Encoded(name or getattr(split, "name", "split"), list(ds["idx"]), [e.ids for e in encodings],
                   [e.type_ids for e in encodings], labels)


def length_grouped_batches(lengths: Sequence[int], batch_size: int, seed: int,
                           mega: int | None = None) -> list[list[int]]:
    """Shuffled batches of similar-length examples: shuffle, sort within mega-batches of `mega` batches, split,
    then shuffle the batch order so that length does not follow a schedule. Every index appears exactly once.

    `mega` defaults to 50 batches, but to at most a quarter of the data (transformers' LengthGroupedSampler rule):
    sorting a small training set whole would make every batch one length band and cost accuracy.
    """
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if mega is None:
        mega = max(1, min(50, len(order) // (4 * batch_size)))
    span = batch_size * mega
    batches = []
    for start in range(0, len(order), span):
        chunk = sorted(order[start : start + span], key=lambda i: lengths[i], reverse=True)
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def random_batches(n: int, batch_size: int, seed: int) -> list[list[int]]:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def eval_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Evaluation order: sorted by length (least padding); predictions are put back in row order."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def collate(data: Encoded, indices: Sequence[int], pad_id: int, regression: bool) -> dict[str, torch.Tensor]:
    """Pad to the longest sequence of this batch (dynamic padding)."""
    width = max(len(data.input_ids[i]) for i in indices)
    ids = torch.full((len(indices), width), pad_id, dtype=torch.long)
    types = torch.zeros((len(indices), width), dtype=torch.long)
    mask = torch.zeros((len(indices), width), dtype=torch.long)
    for row, i in enumerate(indices):
        n = len(data.input_ids[i])
        ids[row, :n] = torch.tensor(data.input_ids[i])
        types[row, :n] = torch.tensor(data.token_type_ids[i])
        mask[row, :n] = 1
    batch = {"input_ids": ids, "token_type_ids": types, "attention_mask": mask}
    if data.labels is not None:
        labels = data.labels[list(indices)]
        batch["labels"] = torch.tensor(labels, dtype=torch.float32 if regression else torch.long)
    return batch


# ----------------------------------------------------------------------------------------------------------------
# Optimisation
# ----------------------------------------------------------------------------------------------------------------
def build_optimizer(model: nn.Module, hp: Hparams) -> torch.optim.Optimizer:
    """AdamW without decay on biases and LayerNorm (as BERT); torch's fused kernel where the device has one."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "LayerNorm" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    try:
        return torch.optim.AdamW(groups, lr=hp.lr, eps=1e-6, fused=True)
    except (RuntimeError, TypeError) as e:
        log.debug("fused AdamW unavailable (%s); using foreach", e)
        return torch.optim.AdamW(groups, lr=hp.lr, eps=1e-6, foreach=True)


def linear_schedule(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup to the peak rate over `warmup` steps, then linear decay to 0 at `total`."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


class PlainStepper:
    """Forward, backward and an optimizer step in plain torch: clipped AdamW with a linear schedule."""

    def __init__(self, model: nn.Module, hp: Hparams, total: int) -> None:
        self.model = model
        self.opt = build_optimizer(model, hp)
        self.sched = linear_schedule(self.opt, int(hp.warmup_ratio * total), total)

    def __call__(self, **batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model(**batch)

    def step(self, loss: torch.Tensor) -> None:
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)

    def lr(self) -> float:
        return self.sched.get_last_lr()[0]

    def close(self) -> None:
        """Nothing outside the model to release."""


class DeepSpeedStepper:
    """The same step through a DeepSpeed engine (ZeRO 0-2), built by the pretraining engine's `initialize` from
    an equivalent train section, so that DeepSpeed stays imported in one place. One process: the fine-tuning
    data is not sharded over ranks."""

    def __init__(self, model: nn.Module, hp: Hparams, total: int, zero_stage: int, precision: str) -> None:
        from bertscale.config import PipelineConfig
        from bertscale.train import distributed
        from bertscale.train.engine import initialize

        env = distributed.read_env()
        if env.world_size != 1:
            raise ConfigError(f"fine-tuning with finetune.zero_stage runs in one process, not {env.world_size} "
                              "ranks: start it without a distributed launcher")
        # `close` releases the engine, then the process group it joined (see `distributed.process_group`); a
        # failure half-way releases what was already started.
        with contextlib.ExitStack() as started:
            started.enter_context(distributed.process_group(env))
            cfg = PipelineConfig.model_validate({"train": {
                "zero_stage": zero_stage, "precision": precision, "optimizer": "adamw", "lr": hp.lr,
                "weight_decay": hp.weight_decay, "eps": 1e-6, "warmup_steps": int(hp.warmup_ratio * total),
                "decay": "linear", "micro_batch_size": hp.batch_size, "grad_accum": 1, "max_steps": total,
                "grad_clip": 1.0}})
            self.engine = initialize(model, cfg, env)
            started.callback(self.engine.destroy)
            self._teardown = started.pop_all()

    def __call__(self, **batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.engine(**batch)

    def step(self, loss: torch.Tensor) -> None:
        # DeepSpeed clips, steps the optimizer and the schedule, and zeroes the gradients.
        self.engine.backward(loss)
        self.engine.step()

    def lr(self) -> float:
        return self.engine.get_lr()[0]

    def close(self) -> None:
        self._teardown.close()


# ----------------------------------------------------------------------------------------------------------------
# Evaluation and prediction
# ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def predict(model: nn.Module, data: Encoded, pad_id: int, batch_size: int = 64, precision: str = "bf16",
            device: torch.device | None = None) -> np.ndarray:
    """Raw outputs in row order: class ids, or floats for a regression head."""
    device = device or next(model.parameters()).device
    regression = getattr(model, "num_labels", 2) == 1
    was_training = model.training
    model.eval()
    out = np.zeros(len(data), dtype=np.float32 if regression else np.int64)
    for indices in eval_batches(data.lengths, batch_size):
        batch = collate(data, indices, pad_id, regression)
        batch.pop("labels", None)
        with _autocast(device, precision):
            _, logits = model(**{k: v.to(device) for k, v in batch.items()})
        logits = logits.float().cpu()
        out[indices] = logits.squeeze(-1).numpy() if regression else logits.argmax(-1).numpy()
    model.train(was_training)
    return out


def evaluate(model: nn.Module, task: TaskSpec, splits: Sequence[Encoded], pad_id: int, precision: str,
             batch_size: int = 64) -> tuple[dict[str, dict[str, float]], dict[str, list[list[int]]]]:
    """GLUE metrics per eval split, and confusion matrices for classification tasks."""
    results, confusion = {}, {}
    for split in splits:
        preds = predict(model, split, pad_id, batch_size, precision)
        results[split.name] = M.compute(task.metrics, split.labels, preds)
        if task.kind == "classification":
            confusion[split.name] = M.confusion_matrix(split.labels, preds, range(task.num_labels)).tolist()
    return results, confusion


def write_submission(task: TaskSpec, data: Encoded, preds: np.ndarray, out_dir: Path) -> Path:
    """`<name>.tsv` with `index<TAB>prediction` rows: label strings, or floats for regression (GLUE's format)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{data.name}.tsv"
    with open(path, "w", encoding="utf-8") as f:
        f.write("index\tprediction\n")
        for idx, p in zip(data.idx, preds.tolist()):
            f.write(f"{idx}\t{p:.3f}\n" if task.kind == "regression" else f"{idx}\t{task.labels[int(p)]}\n")
    return path


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class LoopState:
    """What the loop carries from epoch to epoch."""

    step: int = 0
    tokens: int = 0
    seconds: float = 0.0
    loss_curve: list[tuple[int, float]] = field(default_factory=list)
    history: list[EpochRecord] = field(default_factory=list)
    best_state: dict[str, torch.Tensor] | None = None
    best_epoch: int = 0
    confusion: dict[str, list[list[int]]] = field(default_factory=dict)


def _train_epoch(model: nn.Module, stepper: PlainStepper | DeepSpeedStepper, batches: list[list[int]],
                 data: Encoded, pad_id: int, regression: bool, precision: str, total: int,
                 state: LoopState, log_every: int = 20) -> float:
    """One pass over `batches` (stopping at `total` steps); returns the mean training loss."""
    device = next(model.parameters()).device
    losses = []
    model.train()
    for indices in batches:
        if state.step >= total:
            break
        batch = {k: v.to(device) for k, v in collate(data, indices, pad_id, regression).items()}
        with _autocast(device, precision):
            loss, _ = stepper(**batch)
        stepper.step(loss)
        state.step += 1
        state.tokens += int(batch["attention_mask"].sum())
        losses.append(float(loss.detach()))
        if state.step % log_every == 0:
            state.loss_curve.append((state.step, float(np.mean(losses[-log_every:]))))
    return float(np.mean(losses)) if losses else float("nan")


def train(model: nn.Module, task: TaskSpec, train_data: Encoded, evals: Sequence[Encoded], hp: Hparams, seed: int,
          pad_id: int, precision: str = "bf16", group_by_length: bool = True,
          on_epoch: Callable[[EpochRecord], None] | None = None, zero_stage: int | None = None) -> LoopState:
    """Train for hp.epochs (fractions allowed), evaluate after every epoch, keep the best epoch's weights.
    With `zero_stage`, the steps run through a DeepSpeed engine instead of the plain torch loop."""
    per_epoch = math.ceil(len(train_data) / hp.batch_size)
    total = max(1, math.ceil(per_epoch * hp.epochs))
    stepper = (PlainStepper(model, hp, total) if zero_stage is None
               else DeepSpeedStepper(model, hp, total, zero_stage, precision))
    try:
        return _train_epochs(model, stepper, task, train_data, evals, hp, seed, pad_id, precision, group_by_length,
                             on_epoch, total, per_epoch)
    finally:
        stepper.close()


def _train_epochs(model: nn.Module, stepper: PlainStepper | DeepSpeedStepper, task: TaskSpec, train_data: Encoded,
                  evals: Sequence[Encoded], hp: Hparams, seed: int, pad_id: int, precision: str,
                  group_by_length: bool, on_epoch: Callable[[EpochRecord], None] | None, total: int,
                  per_epoch: int) -> LoopState:
    state = LoopState()
    regression = task.kind == "regression"
    for epoch in range(1, math.ceil(total / per_epoch) + 1):
        if group_by_length:
            batches = length_grouped_batches(train_data.lengths, hp.batch_size, seed + epoch)
        else:
            batches = random_batches(len(train_data), hp.batch_size, seed + epoch)
        start = time.perf_counter()
        lr = stepper.lr()
        loss = _train_epoch(model, stepper, batches, train_data, pad_id, regression, precision, total, state)
        state.seconds += time.perf_counter() - start
        results, confusion = evaluate(model, task, evals, pad_id, precision)
        selection = float(np.mean([r["score"] for r in results.values()])) if results else -loss
        record = EpochRecord(epoch, state.step, loss, lr, time.perf_counter() - start, results, selection)
        state.history.append(record)
        log.info("%s seed %d epoch %d: loss %.4f %s", task.name, seed, epoch, loss,
                 {k: round(v["score"], 4) for k, v in results.items()})
        if state.best_state is None or selection > state.history[state.best_epoch - 1].selection:
            state.best_epoch, state.confusion = epoch, confusion
            state.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if on_epoch is not None:
            on_epoch(record)
    return state


# ----------------------------------------------------------------------------------------------------------------
# One task, one seed
# ----------------------------------------------------------------------------------------------------------------
def recorded_tokenizer(model_path: str | Path) -> tuple[int, dict[str, int]] | None:
    """(size, special token ids) of the tokenizer a checkpoint was saved with: `bertscale_tokenizer.json`'s record,
    else the tokenizer files beside the weights; None when the checkpoint carries no tokenizer."""
    from bertscale.tokenizer import load_tokenizer, special_ids
    from bertscale.tokenizer.wordpiece import STATS_FILE

    path = Path(model_path)
    try:
        meta = json.loads((path / STATS_FILE).read_text())
    except (OSError, ValueError):
        meta = {}
    if isinstance(meta.get("special_ids"), dict) and meta.get("vocab_size"):
        return int(meta["vocab_size"]), {k: int(v) for k, v in meta["special_ids"].items()}
    if not any((path / n).is_file() for n in ("tokenizer.json", "vocab.txt")):
        return None
    own = load_tokenizer(path)
    return own.get_vocab_size(with_added_tokens=True), special_ids(own)


def load_checked_tokenizer(tokenizer: "str | Path | Tokenizer", model_path: str | Path) -> "Tokenizer":
    """The tokenizer, after checking that it fits the checkpoint (ConfigError naming both otherwise): no more
    tokens than embedding rows (fewer is fine: tables are often padded, e.g. 30522 tokens in 30528 rows), and, if
    the checkpoint records the tokenizer it was saved with, that tokenizer's size and [PAD]/[UNK]/[CLS]/[SEP]/[MASK]
    ids."""
    from bertscale.model.hf import read_config
    from bertscale.tokenizer import load_tokenizer, special_ids

    tok = load_tokenizer(tokenizer) if isinstance(tokenizer, (str, Path)) else tokenizer
    name = tokenizer if isinstance(tokenizer, (str, Path)) else "<object>"
    model_vocab = read_config(model_path).get("vocab_size")
    tok_vocab = tok.get_vocab_size(with_added_tokens=True)
    recorded = recorded_tokenizer(model_path)
    hint = "use the tokenizer the checkpoint was pretrained with"
    if model_vocab is not None and tok_vocab > model_vocab:
        raise ConfigError(f"tokenizer {name} has {tok_vocab} tokens but checkpoint {model_path} has vocab_size="
                          f"{model_vocab}: ids past the embedding table cannot be looked up; {hint}")
    if recorded is not None and recorded[0] != tok_vocab:
        raise ConfigError(f"tokenizer {name} has {tok_vocab} tokens but checkpoint {model_path} has vocab_size="
                          f"{model_vocab} and was saved with a tokenizer of {recorded[0]} tokens; {hint}")
    if recorded is None and model_vocab is not None and model_vocab - tok_vocab >= 128:
        log.warning("tokenizer %s has %d tokens for %d embedding rows, more than padding; is it the tokenizer "
                    "checkpoint %s was pretrained with?", name, tok_vocab, model_vocab, model_path)
    if recorded is not None:
        ours = special_ids(tok)
        differ = {k: (ours.get(k), v) for k, v in recorded[1].items() if ours.get(k) != v}
        if differ:
            shown = ", ".join(f"[{k.upper()}] {a} vs {b}" for k, (a, b) in differ.items())
            raise ConfigError(f"tokenizer {name} and the tokenizer recorded with checkpoint {model_path} give "
                              f"special tokens different ids ({shown}); {hint}")
    return tok


def _as_hparams(task: TaskSpec, hparams: Hparams | dict[str, Any] | None) -> Hparams:
    if hparams is None:
        return task.defaults
    if isinstance(hparams, Hparams):
        return hparams
    return Hparams(**{**asdict(task.defaults), **{k: v for k, v in hparams.items() if v is not None}})


def _load_data(task: TaskSpec, tok: "Tokenizer", data_dir: str | Path | None, max_train: int | None,
               max_eval: int | None) -> tuple[Encoded, list[Encoded], int]:
    train_split = load_train(task, data_dir)
    evals = load_eval(task, data_dir)
    if not evals:
        raise ConfigError(f"task {task.name} has no dev split: add one (custom_tasks[].dev) for evaluation")
    train_enc = encode_split(subset(train_split.dataset, max_train), tok, "train")
    eval_enc = [encode_split(subset(s.dataset, max_eval), tok, s.name) for s in evals]
    return train_enc, eval_enc, train_split.skipped + sum(s.skipped for s in evals)


def save_model(model: nn.Module, task: TaskSpec, tokenizer: "str | Path | Tokenizer", out_dir: Path,
               info: dict[str, Any]) -> Path:
    """An HF-format classifier dir with the tokenizer beside it and the task's label set in bertscale_finetune.json."""
    from bertscale.model.hf import export_hf

    export_hf(model, out_dir)
    src = Path(tokenizer) if isinstance(tokenizer, (str, Path)) else None
    src_dir = src.parent if src is not None and src.is_file() else src
    copied = [n for n in TOKENIZER_FILES if src_dir is not None and (src_dir / n).is_file()]
    for name in copied:
        (out_dir / name).write_bytes((src_dir / name).read_bytes())
    if "tokenizer.json" not in copied and not isinstance(tokenizer, (str, Path)):
        tokenizer.save(str(out_dir / "tokenizer.json"))
    meta = {"task": task.name, "kind": task.kind, "labels": list(task.labels), "metrics": list(task.metrics), **info}
    (out_dir / FINETUNE_FILE).write_text(json.dumps(meta, indent=2, default=str) + "\n")
    return out_dir


def finetune_task(
    task: str | TaskSpec,
    model_path: str | Path,
    tokenizer: "str | Path | Tokenizer",
    hparams: Hparams | dict[str, Any] | None = None,
    seed: int = 42,
    *,
    data_dir: str | Path | None = None,
    output_dir: str | Path | None = None,
    custom_tasks: list["CustomTaskConfig"] | None = None,
    max_train_examples: int | None = None,
    max_eval_examples: int | None = None,
    precision: str = "bf16",
    group_by_length: bool = True,
    predict_test: bool = True,
    device: str | None = None,
    on_epoch: Callable[[EpochRecord], None] | None = None,
    zero_stage: int | None = None,
    allow_pickle: bool = False,
) -> TaskResult:
    """Fine-tune `model_path` (HF-format BERT) on one task with one seed; with `output_dir`, save the best
    epoch's model there (HF dir + tokenizer) and the test-set predictions under `output_dir/predictions`."""
    from bertscale.model import BertForSequenceClassification
    from bertscale.model.hf import load_pretrained
    from bertscale.tokenizer import special_ids

    spec = task if isinstance(task, TaskSpec) else get_task(task, custom_tasks)
    hp = _as_hparams(spec, hparams)
    tok = load_checked_tokenizer(tokenizer, model_path)
    pad_id = special_ids(tok)["pad"]
    enc_tok = prepare_tokenizer(tok, hp.max_length)
    train_data, evals, skipped = _load_data(spec, enc_tok, data_dir, max_train_examples, max_eval_examples)
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    model, report = load_pretrained(model_path, BertForSequenceClassification, num_labels=spec.num_labels,
                                    allow_pickle=allow_pickle)
    log.info("%s: %s", spec.name, report.summary())
    model.to(torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")))
    state = train(model, spec, train_data, evals, hp, seed, pad_id, precision, group_by_length, on_epoch, zero_stage)
    # DeepSpeed's bf16 mode casts the module itself; saved models and later predictions use fp32 weights.
    model.float().load_state_dict(state.best_state)
    result = TaskResult(spec.name, seed, asdict(hp), state.best_epoch, state.history[state.best_epoch - 1].eval,
                        state.history, state.loss_curve, state.confusion, train_examples=len(train_data),
                        skipped_rows=skipped, train_seconds=state.seconds,
                        tokens_per_second=state.tokens / state.seconds if state.seconds else 0.0)
    if output_dir is not None:
        out = Path(output_dir)
        info = {"seed": seed, "hparams": asdict(hp), "best_epoch": state.best_epoch, "metrics": result.metrics,
                "source_checkpoint": str(model_path)}
        result.model_dir = str(save_model(model, spec, tokenizer, out / "model", info))
        if predict_test:
            result.predictions = write_predictions(model, spec, enc_tok, pad_id, data_dir, out / "predictions",
                                                   precision)
    return result


def write_predictions(model: nn.Module, task: TaskSpec, tok: "Tokenizer", pad_id: int, data_dir: str | Path | None,
                      out_dir: Path, precision: str = "bf16") -> dict[str, str]:
    """Submission files for the task's test splits (and AX, from the MNLI model); absent test files are skipped."""
    targets = [task] + [t for t in _glue_dependents(task)]
    written = {}
    for spec in targets:
        if spec.fmt == "glue" and data_dir is None and spec.hub is None:
            continue
        try:
            splits = load_test(spec, data_dir)
        except Exception as e:  # noqa: BLE001 - a missing diagnostic set must not lose the trained model
            log.warning("%s: no test predictions (%s)", spec.name, e)
            continue
        for split in splits:
            data = encode_split(split, tok)
            written[split.name] = str(write_submission(spec, data, predict(model, data, pad_id, precision=precision),
                                                       out_dir))
    return written


def _glue_dependents(task: TaskSpec) -> list[TaskSpec]:
    """Tasks predicted with this task's model (AX with MNLI's)."""
    from bertscale.finetune.tasks import GLUE_TASKS

    return [t for t in GLUE_TASKS.values() if t.predict_with == task.name and task.fmt == "glue"]
