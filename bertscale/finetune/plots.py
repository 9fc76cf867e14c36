"""Plots of a fine-tuning suite, written as files so they can be logged as artifacts and opened anywhere: learning
curves per task and confusion matrices of the best runs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from bertscale.finetune.tasks import TaskSpec
from bertscale.finetune.trainer import TaskResult


def plot_learning_curves(task: str, runs: Sequence[TaskResult], path: Path) -> Path:
    """Dev score per epoch for every seed (`runs`: the chosen grid point's), beside the training loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_dev) = plt.subplots(1, 2, figsize=(10, 4))
    for r in runs:
        steps, losses = zip(*r.loss_curve) if r.loss_curve else ([h.step for h in r.history],
                                                                  [h.train_loss for h in r.history])
        ax_loss.plot(steps, losses, label=f"seed {r.seed}")
        ax_dev.plot([h.epoch for h in r.history], [h.selection for h in r.history], marker="o", label=f"seed {r.seed}")
    ax_loss.set(title=f"{task}: training loss", xlabel="step", ylabel="loss")
    ax_dev.set(title=f"{task}: dev score", xlabel="epoch", ylabel="score")
    ax_dev.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_confusion(task: TaskSpec, matrix: list[list[int]], title: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4 + len(task.labels) * 0.5, 3.5 + len(task.labels) * 0.5))
    ax.imshow(np.asarray(matrix), cmap="Blues")
    ax.set(xticks=range(len(task.labels)), yticks=range(len(task.labels)), xticklabels=task.labels,
           yticklabels=task.labels, xlabel="predicted", ylabel="true", title=title)
    for (i, j), v in np.ndenumerate(np.asarray(matrix)):
        ax.text(j, i, str(v), ha="center", va="center")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
