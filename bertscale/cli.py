"""The `bertscale` command line: a thin layer over the library's stage functions.

Every subcommand takes `--config FILE` (YAML overrides) and `--set key.path=value` (repeatable), plus a few
flags for the most common fields. User errors print one line and exit with code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from typing import Any

from bertscale import tracking
from bertscale.config import PipelineConfig, load_config
from bertscale.errors import BertscaleError, ConfigError

log = logging.getLogger("bertscale")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", help="YAML config file (overrides of the defaults).")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="Override one field, e.g. --set corpus.dedup.threshold=0.9 (repeatable; highest precedence).",
    )
    p.add_argument("--workdir", help="Where stages write their outputs (config: workdir).")
    p.add_argument("--no-tracking", action="store_true", help="Do not log to MLflow.")
    p.add_argument("-v", "--verbose", action="store_true", help="Debug logging.")


def _config(args: argparse.Namespace, extra: dict[str, Any]) -> PipelineConfig:
    """Build the config: defaults < --config file < flags < --set overrides."""
    if args.workdir:
        extra["workdir"] = args.workdir
    if args.no_tracking:
        extra.setdefault("tracking", {})["enabled"] = False
    extra = {k: v for k, v in extra.items() if v is not None and v != {}}
    return load_config(args.config, args.overrides, extra)


def _section(**fields: Any) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if v is not None}


# ----------------------------------------------------------------------------------------------------------------
# corpus
# ----------------------------------------------------------------------------------------------------------------
def _add_corpus(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "corpus", help="Clean, filter, deduplicate and shard raw text (Apache Beam).",
        description="Read raw text (txt/gz/bz2/zst, jsonl, parquet, WikiExtractor) from paths, directories, "
        "globs or Beam URIs; write deterministic parquet shards, manifest.json and quarantine.jsonl.",
    )
    _common(p)
    p.add_argument("inputs", nargs="*", help="Input paths, directories, globs or URIs (config: corpus.inputs).")
    p.add_argument("-o", "--output", help="Output directory (config: corpus.output).")
    p.add_argument("--format", choices=["auto", "txt", "jsonl", "parquet", "wikiextractor"])
    p.add_argument("--runner", help="Beam runner, e.g. DirectRunner, DaskRunner, DataflowRunner, FlinkRunner, "
                   "SparkRunner.")
    p.add_argument("--num-workers", type=int, help="Local worker processes (default: number of cores).")
    p.add_argument(
        "--pipeline-option", action="append", dest="pipeline_options", metavar="OPT",
        help="Extra Beam pipeline option, e.g. --pipeline-option=--project=my-project (repeatable).",
    )
    p.add_argument("--setup-file", help="setup.py remote workers install bertscale from (default: this source "
                   "tree's, for remote runners).")
    p.add_argument("--requirements-file", help="requirements.txt remote workers install.")
    p.add_argument("--sdk-container-image", help="Worker image with bertscale installed (deploy/Dockerfile, "
                   "target beam-worker).")
    p.add_argument("--decontaminate", nargs="*", metavar="TASK",
                   help="Remove text sharing an n-gram with the dev/test files of these fine-tuning tasks (GLUE "
                   "names read from --glue-dir, or finetune.custom_tasks names); with no names, finetune.tasks. "
                   "Added to corpus.decontamination.eval_files.")
    p.add_argument("--glue-dir", help="GLUE copy the --decontaminate tasks are read from (config: "
                   "finetune.glue_dir).")
    p.add_argument("--ngram", type=int, help="Words in a matching n-gram (config: corpus.decontamination.ngram, "
                   "default 13).")
    p.add_argument("--decontamination-mode", choices=["document", "passage"],
                   help="Drop a matching document, or only its matching sentences (config: "
                   "corpus.decontamination.mode).")
    p.set_defaults(func=_run_corpus)


def _run_corpus(args: argparse.Namespace) -> int:
    from bertscale.corpus import run_corpus

    runner = _section(runner=args.runner, num_workers=args.num_workers, pipeline_options=args.pipeline_options,
                      setup_file=args.setup_file, requirements_file=args.requirements_file,
                      sdk_container_image=args.sdk_container_image)
    corpus = _section(inputs=args.inputs or None, output=args.output, format=args.format)
    if runner:
        corpus["runner"] = runner
    decontamination = _section(ngram=args.ngram, mode=args.decontamination_mode)
    if decontamination:
        corpus["decontamination"] = decontamination
    finetune = _section(glue_dir=args.glue_dir, tasks=args.decontaminate or None)
    cfg = _config(args, {"corpus": corpus, "finetune": finetune})
    if args.decontaminate is not None:
        from bertscale.lineage import task_eval_files  # the fine-tuning task registry: loaded only when asked

        found = task_eval_files(cfg)
        if not found:
            raise ConfigError(f"--decontaminate: no dev or test file found for {', '.join(cfg.finetune.tasks)}; "
                              "give --glue-dir (a local GLUE copy) or define the tasks in finetune.custom_tasks")
        cfg.corpus.decontamination.eval_files = [*cfg.corpus.decontamination.eval_files, *found]
    result, _ = tracking.track_stage(cfg, "corpus", lambda: run_corpus(cfg))
    print(result.summary())
    return 0


# ----------------------------------------------------------------------------------------------------------------
# tokenizer
# ----------------------------------------------------------------------------------------------------------------
def _add_tokenizer(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tokenizer", help="Train a WordPiece vocabulary on the corpus shards (Hugging Face layout).",
        description="Stream the corpus stage's parquet shards into HF tokenizers' WordPiece trainer and save "
        "tokenizer.json, vocab.txt, tokenizer_config.json and special_tokens_map.json.",
    )
    _common(p)
    p.add_argument("--corpus", help="Corpus stage output dir, or parquet/txt files (default: <workdir>/corpus).")
    p.add_argument("-o", "--output", help="Output directory (config: tokenizer.output).")
    p.add_argument("--vocab-size", type=int, help="Vocabulary size (config: tokenizer.vocab_size).")
    p.add_argument("--cased", action="store_true", default=None, help="Keep case and accents.")
    p.add_argument("--pretrained", help="Use an existing HF tokenizer dir instead of training one.")
    p.set_defaults(func=_run_tokenizer)


def _run_tokenizer(args: argparse.Namespace) -> int:
    from bertscale.tokenizer import train_tokenizer

    section = _section(
        output=args.output, vocab_size=args.vocab_size, pretrained=args.pretrained,
        lowercase=False if args.cased else None,
    )
    cfg = _config(args, {"tokenizer": section})
    result, _ = tracking.track_stage(cfg, "tokenizer", lambda: train_tokenizer(cfg, corpus=args.corpus))
    print(result.summary())
    return 0


# ----------------------------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------------------------
def _add_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "data", help="Tokenize the corpus and build MLM/NSP pretraining instances (memory-mapped shards).",
        description="Tokenize corpus shards with datasets, build Devlin-style NSP pairs or packed sequences per "
        "sequence-length phase, and write memory-mapped shards with a manifest.",
    )
    _common(p)
    p.add_argument("--corpus", help="Corpus stage output dir (default: <workdir>/corpus).")
    p.add_argument("--tokenizer", help="Tokenizer dir (default: <workdir>/tokenizer).")
    p.add_argument("-o", "--output", help="Output directory (config: data.output).")
    p.add_argument("--mode", choices=["nsp", "packed"], help="NSP sentence pairs or packed sequences.")
    p.add_argument("--seq-lengths", type=int, nargs="+", help="One output per phase, e.g. 128 512.")
    p.add_argument("--num-proc", type=int, help="Tokenization processes.")
    p.set_defaults(func=_run_data)


def _run_data(args: argparse.Namespace) -> int:
    from bertscale.data import build_pretraining_data

    section = _section(output=args.output, mode=args.mode, seq_lengths=args.seq_lengths, num_proc=args.num_proc)
    cfg = _config(args, {"data": section})
    result, _ = tracking.track_stage(
        cfg, "data", lambda: build_pretraining_data(cfg, corpus=args.corpus, tokenizer=args.tokenizer))
    print(result.summary())
    return 0


# ----------------------------------------------------------------------------------------------------------------
# pretrain
# ----------------------------------------------------------------------------------------------------------------
def _add_pretrain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pretrain", help="Pretrain BERT (MLM+NSP) with DeepSpeed ZeRO, on one or many processes and nodes.",
        description="Launch DeepSpeed ranks (gloo on CPU, NCCL on GPU) that train our BERT on the pretraining "
        "data; checkpoints, exact resume, MLflow metrics, and an HF export at the end.",
    )
    _common(p)
    p.add_argument("--data", help="Pretraining data dir (default: <workdir>/data).")
    p.add_argument("--tokenizer", help="Tokenizer dir (default: <workdir>/tokenizer).")
    p.add_argument("-o", "--output", help="Checkpoint/output directory (config: train.output).")
    p.add_argument("--size", help="Named model size: tiny, mini, small, medium, base, large.")
    p.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3])
    p.add_argument("--max-steps", type=int)
    p.add_argument("--num-procs", type=int, help="Processes per node (default: config train.num_procs).")
    p.add_argument("--launcher", choices=["deepspeed", "torchrun", "none"], default="deepspeed",
                   help="'none' runs this process as a single rank (or as the rank given by the environment).")
    p.add_argument("--hostfile", help="DeepSpeed hostfile for multi-node runs (ssh launch).")
    p.add_argument("--nnodes", type=int, default=1, help="Nodes, for per-node launch without ssh.")
    p.add_argument("--node-rank", type=int, default=0, help="This node's rank, for per-node launch without ssh.")
    p.add_argument("--master-addr", default="127.0.0.1", help="Rank 0's address for multi-node runs.")
    p.add_argument("--master-port", type=int,
                   help="Rank 0's port (default: a free port on one node, 29500 across nodes).")
    p.set_defaults(func=_run_pretrain)


def _run_pretrain(args: argparse.Namespace) -> int:
    model = _section(size=args.size)
    train = _section(output=args.output, zero_stage=args.zero_stage, max_steps=args.max_steps,
                     num_procs=args.num_procs)
    cfg = _config(args, {"model": model, "train": train})
    if args.launcher == "none":
        from bertscale.train import pretrain
        from bertscale.train.distributed import read_env
        from bertscale.train.run import exit_code

        def in_process():
            return pretrain(cfg, data=args.data, tokenizer=args.tokenizer)

        # A lone process is the whole job and tracks it; a rank of someone else's launcher leaves that to rank 0.
        result = tracking.track_stage(cfg, "pretrain", in_process)[0] if read_env().world_size == 1 \
            else in_process()
        print(result.summary())
        return exit_code(result)
    from bertscale.train.launch import LaunchFailed, LaunchSpec, check_inputs, launch_pretraining

    # A user's mistake is one line and exit code 2, before MLflow or a launcher starts.
    check_inputs(cfg, args.data, args.tokenizer)
    spec = LaunchSpec(
        launcher=args.launcher, num_procs=cfg.train.num_procs, nnodes=args.nnodes, node_rank=args.node_rank,
        master_addr=args.master_addr, master_port=args.master_port, hostfile=args.hostfile,
    )
    try:
        tracking.track_stage(cfg, "pretrain", lambda: launch_pretraining(cfg, spec, args.data, args.tokenizer))
    except LaunchFailed as e:
        return e.exit_code  # the ranks said why on their output
    return 0


# ----------------------------------------------------------------------------------------------------------------
# export
# ----------------------------------------------------------------------------------------------------------------
def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="Write a pretraining checkpoint as a Hugging Face BERT dir (ZeRO shards consolidated).",
        description="Consolidate a checkpoint's ZeRO shards (any stage) into full fp32 weights and write "
        "config.json + model.safetensors that transformers' BertForPreTraining.from_pretrained loads. "
        "CHECKPOINT_DIR is a train output dir, its checkpoints/ dir (both: the `latest` checkpoint) or one "
        "checkpoint's step directory.",
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT_DIR", help="Train output dir, checkpoints dir or step dir.")
    p.add_argument("-o", "--output", required=True, help="Directory to write the HF model into.")
    p.add_argument("--tokenizer", help="Tokenizer dir whose HF files (tokenizer.json, vocab.txt, ...) to copy.")
    p.add_argument("-v", "--verbose", action="store_true", help="Debug logging.")
    p.set_defaults(func=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from bertscale.model.weights import export_checkpoint

    if args.tokenizer and not Path(args.tokenizer).exists():
        raise BertscaleError(f"--tokenizer {args.tokenizer} does not exist")
    try:
        out = export_checkpoint(args.checkpoint, args.output, tokenizer=args.tokenizer)
    except OSError as e:  # an unwritable or full output directory is the user's to fix
        raise BertscaleError(f"cannot write the export to {args.output}: {e.strerror or e}") from None
    print(f"exported {args.checkpoint} -> {out}")
    return 0


# ----------------------------------------------------------------------------------------------------------------
# finetune
# ----------------------------------------------------------------------------------------------------------------
def _add_finetune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "finetune", help="Fine-tune on GLUE tasks or your own (classification, NER, question answering) and register "
        "the best models.",
        description="Fine-tune a checkpoint (HF dir, DeepSpeed checkpoint dir or models:/name@alias) on GLUE "
        "tasks or custom tasks (finetune.custom_tasks in --config: CSV/TSV/JSONL classification or regression, "
        "CoNLL/JSONL token classification, SQuAD v1.1/v2.0 question answering) with the official metrics, over "
        "several seeds; results table, predictions, MLflow registry.",
    )
    _common(p)
    p.add_argument("--checkpoint", help="HF-format dir, DeepSpeed checkpoint dir, or models:/name@alias.")
    p.add_argument("--tokenizer", help="Tokenizer dir (default: the checkpoint's own; given, it replaces it, with a "
                   "warning). Checked against the checkpoint: size and special token ids.")
    p.add_argument("--glue-dir", help="Directory with GLUE task folders (CoLA/, SST-2/, ...).")
    p.add_argument("--tasks", nargs="+", help="Task names, e.g. RTE MRPC STS-B, or custom task names.")
    p.add_argument("--seeds", type=int, nargs="+", help="One run per seed.")
    p.add_argument("-o", "--output", help="Output directory (config: finetune.output).")
    p.set_defaults(func=_run_finetune)


def _run_finetune(args: argparse.Namespace) -> int:
    from bertscale.finetune import run_finetune

    section = _section(checkpoint=args.checkpoint, glue_dir=args.glue_dir, tasks=args.tasks, seeds=args.seeds,
                       output=args.output)
    cfg = _config(args, {"finetune": section})
    print(run_finetune(cfg, tokenizer=args.tokenizer).summary())
    return 0


# ----------------------------------------------------------------------------------------------------------------
# pipeline
# ----------------------------------------------------------------------------------------------------------------
def _add_pipeline(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pipeline", help="Run the whole pipeline as one Prefect flow, reusing finished stages.",
        description="corpus -> tokenizer -> pretraining data -> pretraining -> GLUE fine-tuning -> registry, "
        "each stage cached on a fingerprint of its inputs, config and code.",
    )
    _common(p)
    p.add_argument("--until", default="finetune", choices=["corpus", "tokenizer", "data", "train", "finetune"],
                   help="Last stage to run (default: all).")
    p.set_defaults(func=_run_pipeline)


def _run_pipeline(args: argparse.Namespace) -> int:
    cfg = _config(args, {})  # validate before starting Prefect: a config error is one line, not a failed flow
    from pipelines.pipeline import pipeline_flow, print_where_to_look

    overrides = list(args.overrides)
    if args.workdir:
        overrides.append(f"workdir={args.workdir}")
    if args.no_tracking:
        overrides.append("tracking.enabled=false")
    results = pipeline_flow(config=args.config, overrides=overrides, until=args.until)
    print_where_to_look(cfg, results)
    return 0


# ----------------------------------------------------------------------------------------------------------------
# submit
# ----------------------------------------------------------------------------------------------------------------
def _add_submit(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "submit", help="Render and submit a pretraining job: here, to SLURM (sbatch) or to Kubernetes.",
        description="Render deploy/slurm/pretrain.sbatch or deploy/k8s/pretrain-job.yaml from the config into "
        "<workdir>/jobs/ and submit it (sbatch / kubectl apply), or run it here with --backend local.",
    )
    _common(p)
    p.add_argument("--backend", choices=["local", "slurm", "k8s"], required=True)
    p.add_argument("--job-name", default="bertscale-pretrain", help="Job name (a DNS label).")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--procs-per-node", type=int, default=1, help="Ranks per node (one per GPU).")
    p.add_argument("--gpus-per-node", type=int, default=0)
    p.add_argument("--cpus-per-task", type=int, default=8)
    p.add_argument("--partition", help="SLURM partition.")
    p.add_argument("--time-limit", default="24:00:00", help="SLURM time limit.")
    p.add_argument("--image", default="bertscale:latest", help="Container image (k8s).")
    p.add_argument("--pvc", default="bertscale-workdir", help="PersistentVolumeClaim holding the workdir (k8s).")
    p.add_argument("--master-port", type=int,
                   help="Rendezvous port (default: derived from the SLURM job id; 29500 on k8s).")
    p.add_argument("--template", help="Use this template instead of the one in deploy/.")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="Environment for every rank.")
    p.add_argument("--dry-run", action="store_true",
                   help="Render only; print the paths and the command that would submit the job (e.g. kubectl apply).")
    p.set_defaults(func=_run_submit)


def _run_submit(args: argparse.Namespace) -> int:
    from bertscale.jobs import JobSpec, submit

    bad = [item for item in args.env if "=" not in item or item.startswith("=")]
    if bad:
        raise ConfigError(f"--env {bad[0]!r}: write KEY=VALUE")
    env = dict(item.split("=", 1) for item in args.env)
    spec = JobSpec(
        job_name=args.job_name, nodes=args.nodes, procs_per_node=args.procs_per_node,
        gpus_per_node=args.gpus_per_node, cpus_per_task=args.cpus_per_task, partition=args.partition,
        time_limit=args.time_limit, image=args.image, pvc=args.pvc, template=args.template, env=env,
        master_port=args.master_port,
    )
    print(_json(submit(_config(args, {}), args.backend, spec, dry_run=args.dry_run)))
    return 0


# ----------------------------------------------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------------------------------------------
def _add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "models", help="The MLflow Model Registry: list models, show versions, resolve models:/name@alias.",
        description="Uses the configured tracking store (tracking.tracking_uri; default the workdir's SQLite file).",
    )
    _common(p)
    p.add_argument("action", choices=["list", "show", "resolve"])
    p.add_argument("name", nargs="?", help="show: a model name; resolve: name@alias, name/version or models:/...")
    p.add_argument("--dst", help="resolve: download into this directory.")
    p.set_defaults(func=_run_models)


def _run_models(args: argparse.Namespace) -> int:
    cfg = _config(args, {})
    tracking.configure(cfg)
    if args.action == "list":
        print(_json(tracking.list_models()))
        return 0
    if not args.name:
        raise BertscaleError(f"`bertscale models {args.action}` needs a model name")
    if args.action == "show":
        print(_json(tracking.show_model(args.name)))
        return 0
    uri = args.name if args.name.startswith("models:/") else f"models:/{args.name}"
    print(tracking.resolve_model_uri(uri, dst=args.dst))
    return 0


# ----------------------------------------------------------------------------------------------------------------
# doctor
# ----------------------------------------------------------------------------------------------------------------
def _add_doctor(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "doctor", help="Check a node before a distributed run (versions, master port, disk, gloo/NCCL env).",
        description="On rank 0's node run `bertscale doctor --serve --peers N` first; on every other node run "
        "`bertscale doctor --master-addr HOST`: each checks it can reach rank 0's port and that versions match.",
    )
    _common(p)
    p.add_argument("--master-addr", help="Rank 0's address: check it resolves, is reachable, and versions match.")
    p.add_argument("--master-port", type=int, default=29500)
    p.add_argument("--serve", action="store_true", help="Rank 0's node: answer the other nodes' handshakes.")
    p.add_argument("--peers", type=int, default=1, help="With --serve: how many nodes to wait for.")
    p.add_argument("--timeout", type=float, default=30.0, help="Seconds to wait for the handshake.")
    p.set_defaults(func=_run_doctor)


def _run_doctor(args: argparse.Namespace) -> int:
    from bertscale import doctor

    cfg = _config(args, {})
    if args.serve:
        report = doctor.serve(args.master_port, args.peers, args.timeout, doctor.checkpoint_root(cfg), cfg)
    else:
        report = doctor.run_doctor(cfg, args.master_addr, args.master_port, args.timeout)
    print(report.render())
    return 0 if report.ok else 1


# ----------------------------------------------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------------------------------------------
def _add_config(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="Print the effective config (defaults < file < --set) as YAML.")
    _common(p)
    p.set_defaults(func=_run_config)


def _run_config(args: argparse.Namespace) -> int:
    import yaml

    from bertscale.config import dump_config

    print(yaml.safe_dump(dump_config(_config(args, {})), sort_keys=False), end="")
    return 0


COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_corpus, _add_tokenizer, _add_data, _add_pretrain, _add_export, _add_finetune, _add_pipeline, _add_models,
    _add_submit, _add_doctor, _add_config,
]


class _ThirdPartyNoise(logging.Filter):
    """Drops import-time chatter of optional cloud integrations that a local run does not use."""

    PREFIXES = ("apitools not found", "No module named google.cloud")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.PREFIXES)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(_ThirdPartyNoise())
    if not verbose:
        for name in ("apache_beam", "httpx", "alembic", "urllib3", "filelock"):
            logging.getLogger(name).setLevel(logging.WARNING)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bertscale",
        description="Pretrain and fine-tune BERT: corpus -> tokenizer -> pretraining data -> pretraining -> GLUE.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(getattr(args, "verbose", False))
    try:
        return args.func(args)
    except BertscaleError as e:
        print(f"bertscale {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"bertscale {args.command}: interrupted", file=sys.stderr)
        return 130


def _json(obj: Any) -> str:
    return json.dumps(obj, indent=2, default=str)


if __name__ == "__main__":
    sys.exit(main())
