"""Where weights come from and where they go: one reference resolved to an HF-format dir, DeepSpeed checkpoints
consolidated and exported in the Hugging Face layout, with the tokenizer files beside them.

A weights reference is one of: an HF-format dir (ours or any BERT in safetensors), a DeepSpeed checkpoint of
ours (a train output dir, its `checkpoints/` dir, or one `stepNNNNNNNN/` tag dir), or a registry model
`models:/name@alias` / `models:/name/version`. `resolve_weights` turns any of them into an HF dir, which
`bertscale.model.hf.load_pretrained` loads; pretraining's warm start and fine-tuning both start here.

A checkpoint tag dir holds DeepSpeed's files and our `bert_config.json` (the architecture), which is what makes
it exportable without the run's config. ZeRO 1-3 shards are merged into full fp32 weights by DeepSpeed's
`zero_to_fp32` (a reader of its file format; the training engine itself stays behind `bertscale.train`'s door).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

import torch

from bertscale import tracking
from bertscale.config import PipelineConfig
from bertscale.errors import InputError
from bertscale.model.bert import BertConfig, BertForPreTraining
from bertscale.model.hf import export_hf, is_hf_dir
from bertscale.tokenizer.wordpiece import STATS_FILE

log = logging.getLogger(__name__)

MODEL_CONFIG = "bert_config.json"  # our architecture record in every checkpoint tag dir
# The tokenizer files of the HF layout, copied beside exported weights so the dir is a complete HF model.
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json")
def resolve_weights(ref: str, export_dir: str | Path | None = None, cfg: PipelineConfig | None = None) -> Path:
    """An HF-format model directory for `ref`: an HF dir as is; a DeepSpeed checkpoint dir exported with
    `export_checkpoint` (into `export_dir`); `models:/name@alias` or `models:/name/version` downloaded from the
    MLflow registry (the one `cfg` points at, else MLflow's current one)."""
    if ref.startswith("models:/"):
        if cfg is not None:
            tracking.configure(cfg)
        return tracking.resolve_model_uri(ref, export_dir)
    p = Path(ref)
    if not p.exists():
        raise InputError(f"checkpoint {ref} does not exist; pass an HF dir, a DeepSpeed checkpoint dir or "
                         "models:/<name>@<alias>")
    if p.is_dir() and is_hf_dir(p):
        return p
    if p.is_file() and p.suffix == ".safetensors":
        return p.parent
    out = Path(export_dir) if export_dir else Path(tempfile.mkdtemp(prefix="bertscale-export-"))
    log.info("exporting DeepSpeed checkpoint %s to %s", p, out)
    return export_checkpoint(p, out)


def locate_checkpoint(path: str | Path) -> tuple[Path, str]:
    """(checkpoint root, tag) from a root dir (its `latest`), a tag dir, or a train output dir."""
    p = Path(path)
    for root in (p, p / "checkpoints"):
        if (root / "latest").is_file():
            return root, (root / "latest").read_text().strip()
    if (p / MODEL_CONFIG).is_file():
        return p.parent, p.name
    raise InputError(
        f"{p} is not a bertscale checkpoint: expected a checkpoint dir with {MODEL_CONFIG}, or a directory whose "
        "`latest` file names one (e.g. <workdir>/train/checkpoints)"
    )


def consolidated_state_dict(root: Path, tag: str) -> dict[str, torch.Tensor]:
    """Full fp32 weights of a checkpoint: ZeRO shards merged (1-3) or the module's own state (stage 0)."""
    tag_dir = root / tag
    if any(tag_dir.glob("*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
    model_file = tag_dir / "mp_rank_00_model_states.pt"
    if not model_file.is_file():
        raise InputError(f"{tag_dir} holds neither ZeRO shards nor {model_file.name}: the checkpoint is incomplete")
    # Stage 0 keeps no fp32 copy on disk outside the optimizer, so bf16 runs export bf16-rounded weights.
    module = torch.load(model_file, map_location="cpu", weights_only=False)["module"]
    return {k: v.float() for k, v in module.items()}


def export_checkpoint(checkpoint_dir: str | Path, out_dir: str | Path, tokenizer: str | Path | None = None) -> Path:
    """Write any checkpoint as a Hugging Face BERT dir (config.json + model.safetensors, + tokenizer files)."""
    root, tag = locate_checkpoint(checkpoint_dir)
    config = BertConfig.from_dict(json.loads((root / tag / MODEL_CONFIG).read_text()))
    model = BertForPreTraining(config)
    state = consolidated_state_dict(root, tag)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # The MLM decoder is tied to the word embeddings, so it may be stored under either name only.
    missing = [k for k in missing if not k.startswith("cls.predictions.decoder.")]
    if missing or unexpected:
        raise InputError(f"checkpoint {root / tag} does not match its bert_config.json: missing {missing}, "
                         f"unexpected {unexpected}")
    out = Path(out_dir)
    export_hf(model, out)
    if tokenizer is not None:
        copy_tokenizer_files(tokenizer, out)
    return out


def copy_tokenizer_files(tokenizer: str | Path, out: Path, with_record: bool = False) -> list[str]:
    """Copy the HF tokenizer files that exist beside the model, so `out` is a complete HF model dir; with
    `with_record`, also bertscale's tokenizer record (size and special token ids, which fine-tuning checks)."""
    src = Path(tokenizer)
    src_dir = src.parent if src.is_file() else src
    copied = []
    for name in TOKENIZER_FILES + ((STATS_FILE,) if with_record else ()):
        if (src_dir / name).is_file():
            shutil.copy2(src_dir / name, out / name)
            copied.append(name)
    return copied
