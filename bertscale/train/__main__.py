"""`python -m bertscale.train`: one pretraining rank, as started by the DeepSpeed launcher, torchrun or srun."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback

from bertscale.config import load_config
from bertscale.errors import BertscaleError
from bertscale.train.distributed import PeerLostError
from bertscale.train.run import exit_code, pretrain


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bertscale.train", description=__doc__)
    p.add_argument("-c", "--config", help="YAML config file (the launcher passes the resolved config).")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="Override one field, e.g. --set train.max_steps=100 (repeatable).")
    p.add_argument("--data", help="Pretraining data dir (default: <workdir>/data).")
    p.add_argument("--tokenizer", help="Tokenizer dir (default: <workdir>/tokenizer).")
    # Older launchers pass the local rank as an argument; the environment's LOCAL_RANK is what we use.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s")
    try:
        result = pretrain(load_config(args.config, args.overrides), data=args.data, tokenizer=args.tokenizer)
    except PeerLostError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        # Skip interpreter teardown: destroying a process group whose peer is gone can block on it.
        os._exit(e.exit_code)
    except BertscaleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception:
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            raise
        # A bug on one rank of several: print it, and exit without the teardown that can wait on the others.
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    if rank == "0":
        print(result.summary(), flush=True)
    return exit_code(result)  # a signal-stopped run is not finished: 143 says so to the launcher/scheduler


if __name__ == "__main__":
    sys.exit(main())
