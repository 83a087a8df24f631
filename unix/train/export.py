"""Weights folders from training: OUT/final at the end of a run, and `unix train-export` for any
checkpoint (checkpoints themselves are DCP shards, not weights folders).

    OUT/final/   model.safetensors, config.json   the weights (the EMA's when EMA is on)
                 train.json                       the stages the weights have been trained through
                 tokenizer files, vae/...         what `unix report` / `unix generate` need besides

The folder is assembled in `OUT/.final.partial/` and renamed into place; an export killed between
its renames is put right by the next one (`unix.weights.folder.recover`).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch

from unix.errors import UserError
from unix.train.checkpoint import DCP_INDEX, TRAINER_FILE, quiet_dcp
from unix.weights.folder import CONFIG_FILE, VAE_FILES, publish, read_model_config, recover, save_model

log = logging.getLogger(__name__)
STAGES_FILE = "train.json"  # which stages a weights folder of ours has been trained through


def vae_file_name(path: Path) -> str:
    """Where a VAE file goes in a weights folder, under the name inference looks for."""
    return VAE_FILES[0] if path.suffix == ".safetensors" else VAE_FILES[1]


def find_vae(vae: str, init: str) -> Path | None:
    """The VAE a stage trains with: `vae=`, else the one in the `init` folder."""
    if vae:
        return Path(vae)
    return next((Path(init) / v for v in VAE_FILES if init and (Path(init) / v).is_file()), None)


STATS_IMAGES = 1000  # training images summarised in input_stats.json (unix.infer.domain)
STATS_SHARDS = 250  # at most this many shards are opened for them (one row group each)


def training_input_stats(shards: str, split: str) -> dict | None:
    """What the model's training images look like (size, aspect, intensity), for the out-of-domain
    notice of `unix report`: up to STATS_IMAGES rows from the first row group of up to STATS_SHARDS
    evenly spaced shards of the split. None (and a log line) when fewer than 2 images can be read."""
    import numpy as np
    import pyarrow.parquet as pq

    from unix.data.shards import shard_paths
    from unix.infer.domain import compute_input_stats
    from unix.infer.io import decode_image

    paths = shard_paths(shards, split)
    if not paths:
        return None
    paths = [paths[i] for i in np.unique(np.linspace(0, len(paths) - 1, min(len(paths), STATS_SHARDS)).round().astype(int))]
    per_shard = -(-STATS_IMAGES // len(paths))
    images = []
    for path in paths:
        try:
            column = pq.ParquetFile(path).read_row_group(0, columns=["image"]).column("image").to_pylist()
        except Exception as e:  # a damaged shard was already reported by training; the stats go without it
            log.warning("input statistics: %s not read (%s)", path, e)
            continue
        for k, data in enumerate(column[:: max(1, len(column) // per_shard)][:per_shard]):
            try:
                images.append(decode_image(data, f"{path.name} row {k}"))
            except (UserError, TypeError):
                continue
    if len(images) < 2:
        log.warning("input statistics: fewer than 2 readable images in %s; input_stats.json not written", shards)
        return None
    return compute_input_stats(images, f"{len(images)} images of the {split} split of {shards}, unix train export")


def write_weights_folder(folder: Path, model, state_dict: dict, stages: list[str], save_tokenizer, vae,
                         input_stats: dict | None = None) -> Path:
    """Rank 0 only. `save_tokenizer(dir)` writes the tokenizer files; `vae` is the codec in memory
    (written from it, not read again), a VAE file to copy, or None; `input_stats` goes to
    input_stats.json."""
    from unix.infer.domain import write_input_stats

    from unix.weights.ldm_vae import save_vae_safetensors

    recover(folder)
    for left in [*folder.parent.glob(f".{folder.name}.*"), *folder.parent.glob(f"..{folder.name}.*")]:
        shutil.rmtree(left, ignore_errors=True)  # staging of an export that was interrupted
    part = folder.with_name(f".{folder.name}.partial")
    save_model(model, part, {STAGES_FILE: json.dumps({"stages": stages}).encode()}, state_dict=state_dict)
    save_tokenizer(part)
    if isinstance(vae, Path):
        (part / vae_file_name(vae)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(vae, part / vae_file_name(vae))
    elif vae is not None:
        (part / VAE_FILES[0]).parent.mkdir(parents=True, exist_ok=True)
        save_vae_safetensors(vae, part / VAE_FILES[0])
    if input_stats is not None:
        write_input_stats(part, input_stats)
    publish(part, folder)
    return folder


def export_checkpoint(ckpt: Path, dest: Path, ema: bool = False) -> Path:
    """One process: the checkpoint's trained weights (or its EMA's) -> a weights folder at `dest`,
    with the checkpoint's tokenizer and the run's VAE (OUT/run.json names it)."""
    import torch.distributed.checkpoint as dcp

    from unix.models.unix import UniX

    if not (ckpt / DCP_INDEX).is_file() or not (ckpt / TRAINER_FILE).is_file():
        raise UserError(f"{ckpt}: not a training checkpoint (no {DCP_INDEX} and {TRAINER_FILE})")
    if dest.exists():
        raise UserError(f"--out {dest} exists; choose a new folder")
    with torch.device("meta"):
        model = UniX(read_model_config(ckpt))
    model = model.to_empty(device="cpu")
    model.reset_buffers()
    weights = model.state_dict()
    saved = dcp.FileSystemReader(ckpt).read_metadata().state_dict_metadata
    wanted = {"model": weights}
    if ema:
        shadow = {k.removeprefix("train.ema."): torch.empty(m.size) for k, m in saved.items() if k.startswith("train.ema.")}
        if not shadow:
            raise UserError(f"{ckpt}: the run kept no EMA (optim.ema_decay=0); export without --ema")
        wanted["ema"] = shadow
    with quiet_dcp():
        dcp.load({"train": wanted}, storage_reader=dcp.FileSystemReader(ckpt))
    if ema:
        weights = {**weights, **wanted["ema"]}
    vae = _run_vae(ckpt.parent.parent)
    stages = json.loads((ckpt / STAGES_FILE).read_text())["stages"]
    keep = {p.name for p in ckpt.iterdir() if p.is_file()} - {DCP_INDEX, TRAINER_FILE, CONFIG_FILE, STAGES_FILE}
    keep = {n for n in keep if not n.endswith(".distcp")}  # what is left: the tokenizer files

    def copy_tokenizer(folder: Path) -> None:
        for name in keep:
            shutil.copyfile(ckpt / name, folder / name)

    data = _run_config(ckpt.parent.parent).get("data", {})
    stats = training_input_stats(data["shards"], data.get("split", "train")) if data.get("shards") else None
    return write_weights_folder(dest, model, weights, stages, copy_tokenizer, vae, stats)


def _run_config(out: Path) -> dict:
    run = out / "run.json"
    return json.loads(run.read_text()).get("config", {}) if run.is_file() else {}


def _run_vae(out: Path) -> Path | None:
    cfg = _run_config(out)
    vae = find_vae(cfg.get("vae", ""), cfg.get("init", ""))
    if vae is None or not vae.is_file():
        log.warning("%s names no VAE that exists: the export has none (reports work, images need one)", out / "run.json")
        return None
    return vae
