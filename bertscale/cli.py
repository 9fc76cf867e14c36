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

from bertscale.config import PipelineConfig, load_config
from bertscale.errors import BertscaleError

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
    p.add_argument("--runner", help="Beam runner, e.g. DirectRunner, DataflowRunner, FlinkRunner, SparkRunner.")
    p.add_argument("--num-workers", type=int, help="Local worker processes (default: number of cores).")
    p.add_argument(
        "--pipeline-option", action="append", dest="pipeline_options", metavar="OPT",
        help="Extra Beam pipeline option, e.g. --pipeline-option=--project=my-project (repeatable).",
    )
    p.set_defaults(func=_run_corpus)


def _run_corpus(args: argparse.Namespace) -> int:
    from bertscale.corpus import run_corpus

    runner = _section(runner=args.runner, num_workers=args.num_workers, pipeline_options=args.pipeline_options)
    corpus = _section(inputs=args.inputs or None, output=args.output, format=args.format)
    if runner:
        corpus["runner"] = runner
    cfg = _config(args, {"corpus": corpus})
    result = run_corpus(cfg)
    print(result.summary())
    return 0


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


COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_config, _add_corpus]


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
    logging.basicConfig(
        level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
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
