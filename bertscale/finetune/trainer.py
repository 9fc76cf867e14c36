"""The fine-tuning loop for one task and one seed: encode, train with evaluation every epoch, keep the best epoch.
What differs between kinds of task (head, inputs, metrics, prediction files) comes from `bertscale.finetune.kinds`.

Speed on CPU comes from four places, each cheap to reason about: examples are batched with others of similar
length, so dynamic padding pads little (`bertscale.finetune.batching`); the model drops padding tokens
internally (`BertConfig.unpad`); matmuls run under bf16 autocast; the optimizer is pretraining's
(`bertscale.train.optim`: AdamW, torch's fused kernel where available) with pretraining's warmup-then-linear
schedule. The optimizer step can instead go through a DeepSpeed engine (`zero_stage`), built through the same
door as pretraining's (`bertscale.train.deepspeed_engine`).
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
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer
from torch import nn

from bertscale.config import CustomTaskConfig
from bertscale.errors import ConfigError
from bertscale.finetune.batching import autocast, length_grouped_batches, random_batches
from bertscale.finetune.encoding import load_checked_tokenizer
from bertscale.finetune.evaluation import Evaluation
from bertscale.finetune.kinds import Split, TaskKind, kind_of
from bertscale.finetune.tasks import Hparams, TaskSpec, get_task, load_eval, load_train
from bertscale.hardware import resolve_compile, resolve_precision
from bertscale.model.bert import compile_dense_blocks
from bertscale.model.hf import FINETUNE_FILE, export_hf
from bertscale.model.weights import copy_tokenizer_files
from bertscale.progress import ProgressBar, logs_above, progress_bar
from bertscale.tokenizer import special_ids
from bertscale.train import deepspeed_engine, distributed
from bertscale.train.deepspeed_engine import EngineSpec, build_ds_config
from bertscale.train.optim import OptimizerSpec, build_optimizer
from bertscale.train.schedule import build_scheduler

log = logging.getLogger(__name__)



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
    details: dict[str, dict[str, Any]] = field(default_factory=dict)  # eval split -> the kind's other numbers
    dev_predictions: dict[str, str] = field(default_factory=dict)  # prediction name -> file (token/span kinds)

    @property
    def score(self) -> float:
        return self.history[self.best_epoch - 1].selection if self.history else float("nan")


# ----------------------------------------------------------------------------------------------------------------
# Optimisation
# ----------------------------------------------------------------------------------------------------------------
def optimizer_spec(hp: Hparams) -> OptimizerSpec:
    """BERT's fine-tuning AdamW: the task's rate and weight decay (none on biases and LayerNorm), eps 1e-6."""
    return OptimizerSpec(lr=hp.lr, weight_decay=hp.weight_decay, kind="adamw", betas=(0.9, 0.999), eps=1e-6)


class PlainStepper:
    """Forward, backward and an optimizer step in plain torch: clipped AdamW with warmup, then linear decay."""

    def __init__(self, model: nn.Module, hp: Hparams, total: int) -> None:
        self.model = model
        self.opt = build_optimizer(model, optimizer_spec(hp), next(model.parameters()).device)
        self.sched = build_scheduler(self.opt, int(hp.warmup_ratio * total), total, "linear")

    def __call__(self, **batch: torch.Tensor) -> tuple[torch.Tensor, ...]:
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
    """The same step through a DeepSpeed engine (ZeRO 0-2), with the same optimizer and schedule, built through
    pretraining's DeepSpeed door. One process: the fine-tuning data is not sharded over ranks."""

    def __init__(self, model: nn.Module, hp: Hparams, total: int, zero_stage: int, precision: str) -> None:
        env = distributed.read_env()
        if env.world_size != 1:
            raise ConfigError(f"fine-tuning with finetune.zero_stage runs in one process, not {env.world_size} "
                              "ranks: start it without a distributed launcher")
        # `close` releases the engine, then the process group it joined (see `distributed.process_group`); a
        # failure half-way releases what was already started.
        with contextlib.ExitStack() as started:
            started.enter_context(distributed.process_group(env))
            device = env.device()
            spec = EngineSpec(zero_stage, precision, micro_batch_size=hp.batch_size, grad_accum=1, grad_clip=1.0)
            ds_config = build_ds_config(spec, env.world_size, device.type == "cuda")
            optimizer = build_optimizer(model, optimizer_spec(hp), device)
            scheduler = build_scheduler(optimizer, int(hp.warmup_ratio * total), total, "linear")
            self.engine = deepspeed_engine.initialize(model, optimizer, scheduler, ds_config)
            started.callback(deepspeed_engine.destroy, self.engine)
            self._teardown = started.pop_all()

    def __call__(self, **batch: torch.Tensor) -> tuple[torch.Tensor, ...]:
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
    best_evals: dict[str, Evaluation] = field(default_factory=dict)

    @property
    def confusion(self) -> dict[str, list[list[int]]]:
        return {k: e.confusion for k, e in self.best_evals.items() if e.confusion is not None}


def _train_epoch(model: nn.Module, stepper: PlainStepper | DeepSpeedStepper, batches: list[list[int]],
                 make_batch: Callable[[Sequence[int]], dict[str, torch.Tensor]], precision: str, total: int,
                 state: LoopState, bar: ProgressBar, log_every: int = 20) -> float:
    """One pass over `batches` (stopping at `total` steps); returns the mean training loss."""
    device = next(model.parameters()).device
    losses = []
    model.train()
    for indices in batches:
        if state.step >= total:
            break
        batch = {k: v.to(device) for k, v in make_batch(indices).items()}
        with autocast(device, precision):
            loss = stepper(**batch)[0]
        stepper.step(loss)
        state.step += 1
        state.tokens += int(batch["attention_mask"].sum())
        losses.append(float(loss.detach()))
        if state.step % log_every == 0:
            state.loss_curve.append((state.step, float(np.mean(losses[-log_every:]))))
        # Drawn at the bar's next redraw (refresh=False): a redraw per step would defeat its rate limit.
        bar.set_postfix(loss=f"{np.mean(losses[-log_every:]):.4f}", refresh=False)
        bar.update(1)
    return float(np.mean(losses)) if losses else float("nan")


def train(model: nn.Module, task: TaskSpec, train_data: Split, evals: Sequence[Split], hp: Hparams, seed: int,
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


def _train_epochs(model: nn.Module, stepper: PlainStepper | DeepSpeedStepper, task: TaskSpec, train_data: Split,
                  evals: Sequence[Split], hp: Hparams, seed: int, pad_id: int, precision: str,
                  group_by_length: bool, on_epoch: Callable[[EpochRecord], None] | None, total: int,
                  per_epoch: int) -> LoopState:
    state = LoopState()
    kind = kind_of(task)

    def make_batch(indices: Sequence[int]) -> dict[str, torch.Tensor]:
        return kind.collate(task, train_data, indices, pad_id)

    # The bar's rate gives the ETA of the training steps; evaluation time between epochs is not in it.
    with progress_bar(total, f"finetune {task.name} seed {seed}", "step") as bar, logs_above(bar):
        for epoch in range(1, math.ceil(total / per_epoch) + 1):
            if group_by_length:
                batches = length_grouped_batches(train_data.lengths, hp.batch_size, seed + epoch)
            else:
                batches = random_batches(len(train_data), hp.batch_size, seed + epoch)
            start = time.perf_counter()
            lr = stepper.lr()
            loss = _train_epoch(model, stepper, batches, make_batch, precision, total, state, bar)
            state.seconds += time.perf_counter() - start
            evaluations = {split.name: kind.evaluate(model, task, split, pad_id, precision) for split in evals}
            results = {name: e.metrics for name, e in evaluations.items()}
            selection = float(np.mean([r["score"] for r in results.values()])) if results else -loss
            record = EpochRecord(epoch, state.step, loss, lr, time.perf_counter() - start, results, selection)
            state.history.append(record)
            log.info("%s seed %d epoch %d: loss %.4f %s", task.name, seed, epoch, loss,
                     {k: round(v["score"], 4) for k, v in results.items()})
            if state.best_state is None or selection > state.history[state.best_epoch - 1].selection:
                state.best_epoch, state.best_evals = epoch, evaluations
                state.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            if on_epoch is not None:
                on_epoch(record)
    return state


# ----------------------------------------------------------------------------------------------------------------
# One task, one seed
# ----------------------------------------------------------------------------------------------------------------
def _as_hparams(task: TaskSpec, hparams: Hparams | dict[str, Any] | None) -> Hparams:
    if hparams is None:
        return task.defaults
    if isinstance(hparams, Hparams):
        return hparams
    return Hparams(**{**asdict(task.defaults), **{k: v for k, v in hparams.items() if v is not None}})


def save_model(model: nn.Module, task: TaskSpec, tokenizer: str | Path | Tokenizer, out_dir: Path,
               info: dict[str, Any], dev: dict[str, Evaluation] | None = None) -> Path:
    """An HF-format model dir with the tokenizer beside it and the task record (name, kind, labels, what the kind
    needs to predict, e.g. a QA model's null threshold tuned on `dev`) in bertscale_finetune.json."""
    kind = kind_of(task)
    export_hf(model, out_dir, kind.export_labels(task))
    if isinstance(tokenizer, (str, Path)):
        copy_tokenizer_files(tokenizer, out_dir, with_record=True)
    else:
        tokenizer.save(str(out_dir / "tokenizer.json"))
    meta = {"task": task.name, "kind": task.kind, "labels": list(task.labels), "metrics": list(task.metrics),
            **kind.record(task, dev or {}), **info}
    (out_dir / FINETUNE_FILE).write_text(json.dumps(meta, indent=2, default=str) + "\n")
    return out_dir


def load_task_data(kind: TaskKind, task: TaskSpec, tok: Tokenizer, hp: Hparams, data_dir: str | Path | None,
                   max_train: int | None, max_eval: int | None) -> tuple[Split, list[Split], int]:
    """The encoded training split, the encoded dev splits, and how many records were skipped as unreadable."""
    train_split = load_train(task, data_dir)
    evals = load_eval(task, data_dir)
    if not evals:
        raise ConfigError(f"task {task.name} has no dev split: add one (custom_tasks[].dev) for evaluation")
    train_data = kind.encode(task, train_split, tok, hp, max_train, train=True)
    eval_data = [kind.encode(task, s, tok, hp, max_eval, train=False) for s in evals]
    return train_data, eval_data, train_split.skipped + sum(s.skipped for s in evals)


def finetune_task(
    task: str | TaskSpec,
    model_path: str | Path,
    tokenizer: str | Path | Tokenizer,
    hparams: Hparams | dict[str, Any] | None = None,
    seed: int = 42,
    *,
    data_dir: str | Path | None = None,
    output_dir: str | Path | None = None,
    custom_tasks: list[CustomTaskConfig] | None = None,
    max_train_examples: int | None = None,
    max_eval_examples: int | None = None,
    precision: str = "auto",
    compile: bool | str = "auto",
    group_by_length: bool = True,
    predict_test: bool = True,
    device: str | None = None,
    on_epoch: Callable[[EpochRecord], None] | None = None,
    zero_stage: int | None = None,
    allow_pickle: bool = False,
) -> TaskResult:
    """Fine-tune `model_path` (HF-format BERT) on one task of any kind with one seed; with `output_dir`, save
    the best epoch's model there (HF dir + tokenizer), the test-set predictions under `output_dir/predictions`
    and, for token classification and question answering, the best epoch's dev predictions under
    `output_dir/dev_predictions`."""
    spec = task if isinstance(task, TaskSpec) else get_task(task, custom_tasks)
    kind = kind_of(spec)
    hp = _as_hparams(spec, hparams)
    tok = load_checked_tokenizer(tokenizer, model_path)
    pad_id = special_ids(tok)["pad"]
    train_data, evals, skipped = load_task_data(kind, spec, tok, hp, data_dir, max_train_examples, max_eval_examples)
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    model, report = kind.load_model(spec, model_path, allow_pickle)
    log.info("%s: %s", spec.name, report.summary())
    where = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(where)
    precision = resolve_precision(precision, where).name
    if resolve_compile(compile, where)[0] and zero_stage is None:
        compile_dense_blocks(model)
    state = train(model, spec, train_data, evals, hp, seed, pad_id, precision, group_by_length, on_epoch, zero_stage)
    # DeepSpeed's bf16 mode casts the module itself; saved models and later predictions use fp32 weights.
    model.float().load_state_dict(state.best_state)
    result = TaskResult(spec.name, seed, asdict(hp), state.best_epoch, state.history[state.best_epoch - 1].eval,
                        state.history, state.loss_curve, state.confusion, train_examples=len(train_data),
                        skipped_rows=skipped, train_seconds=state.seconds,
                        tokens_per_second=state.tokens / state.seconds if state.seconds else 0.0,
                        details={k: e.details for k, e in state.best_evals.items() if e.details})
    if output_dir is not None:
        out = Path(output_dir)
        info = {"seed": seed, "hparams": asdict(hp), "best_epoch": state.best_epoch, "metrics": result.metrics,
                "source_checkpoint": str(model_path)}
        result.model_dir = str(save_model(model, spec, tokenizer, out / "model", info, state.best_evals))
        for split in evals:
            result.dev_predictions.update(kind.write_dev(spec, split, state.best_evals[split.name],
                                                         out / "dev_predictions"))
        if predict_test:
            result.predictions = kind.write_test(model, spec, tok, hp, pad_id, data_dir, out / "predictions",
                                                 precision, state.best_evals)
    return result
