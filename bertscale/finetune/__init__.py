"""Fine-tuning on GLUE and custom tasks of four kinds (classification, regression, token classification such as
NER, extractive question answering such as SQuAD): task registry and loaders, official metrics, the training
loop, and suites over tasks x grid x seeds with MLflow logging and Model Registry registration."""

from bertscale.finetune.metrics import glue_average
from bertscale.finetune.suite import SuiteResult, TaskSummary, resolve_tokenizer, run_finetune
from bertscale.finetune.tasks import GLUE_TASKS, Hparams, TaskSpec, get_task, load_eval, load_test, load_train
from bertscale.finetune.trainer import TaskResult, finetune_task

__all__ = [
    "GLUE_TASKS",
    "Hparams",
    "SuiteResult",
    "TaskResult",
    "TaskSpec",
    "TaskSummary",
    "finetune_task",
    "get_task",
    "glue_average",
    "load_eval",
    "load_test",
    "load_train",
    "resolve_tokenizer",
    "run_finetune",
]
