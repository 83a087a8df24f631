"""Checkpoints, sharded with torch.distributed.checkpoint (DCP): every rank writes its own shards
(nothing is gathered to one rank), and any number of ranks can load them.

    OUT/checkpoints/step-0000500/   .metadata          DCP's index of where every tensor's pieces are
                                    __0_0.distcp ...   one file per rank: its shards of the model, the
                                                       optimizer state and the EMA
                                    trainer.pt         step, every rank's data position and RNG state,
                                                       the REPA head (small; written by rank 0)
                                    config.json, train.json, tokenizer files: what `unix train-export`
                                                       needs to turn the checkpoint into a weights folder

A checkpoint is written into `checkpoints/.step-0000500.partial/` and renamed into place once every
rank's shards, DCP's index and trainer.pt are down, so a checkpoint under its real name is always
whole. What an interrupted save leaves (the partial folder) is removed before the next save and
when a run starts. Resuming takes the newest checkpoint that loads; one that does not (a truncated
or overwritten file) is named in a warning, renamed `step-0000500.corrupt` once an older one has
loaded, and the run goes on from the older one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

from unix.errors import UserError
from unix.train import parallel
from unix.weights.folder import publish, recover

log = logging.getLogger(__name__)
STEP_DIR = re.compile(r"^step-(\d{7})$")
TRAINER_FILE = "trainer.pt"
DCP_INDEX = ".metadata"  # DCP's coordinator writes it after every rank has written its shards
OLD_FORMAT_FILE = "train_state.pt"  # checkpoints before DCP: a weights folder plus this file


class TrainingState(Stateful):
    """What DCP saves and loads, each rank its own part: model, optimizer and EMA, by parameter name.
    Sharded (FSDP2) tensors are saved as shards and re-sharded on load; plain ones (one process,
    or replicas) are written once."""

    def __init__(self, model, optimizer, ema=None):
        self.model, self.optimizer, self.ema = model, optimizer, ema

    def state_dict(self) -> dict:
        return {"model": get_model_state_dict(self.model), "optimizer": get_optimizer_state_dict(self.model, self.optimizer),
                "ema": self.ema.shadow if self.ema is not None else {}}

    def load_state_dict(self, state: dict) -> None:
        # DCP loaded into the tensors state_dict() handed out (the EMA's own); these put the rest in place
        set_model_state_dict(self.model, state["model"])
        set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"])


def full_model_state(model) -> dict:
    """The model's full tensors on CPU, for the export: a collective under FSDP2, after which rank 0
    holds them and the other ranks nothing."""
    if parallel.is_sharded(model):
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return model.state_dict()


def checkpoints(out: Path) -> list[Path]:
    """Whole checkpoints of a run, oldest first."""
    root = out / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / TRAINER_FILE).is_file() and (p / DCP_INDEX).is_file())


def old_format(out: Path) -> list[Path]:
    root = out / "checkpoints"
    return sorted(p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / OLD_FORMAT_FILE).is_file()) if root.is_dir() else []


def clean_unfinished(out: Path) -> None:
    """Remove partial checkpoints of interrupted saves (rank 0 only; every rank waits after)."""
    root = out / "checkpoints"
    if not root.is_dir():
        return
    for p in root.glob(".step-*.old"):
        recover(root / p.name[1:-len(".old")])
    for p in root.glob(".step-*"):
        log.info("removing %s (left by an interrupted save)", p)
        shutil.rmtree(p, ignore_errors=True)


@contextlib.contextmanager
def quiet_dcp():
    """DCP warns when it runs without a process group; one process is what we mean then."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def save_checkpoint(out: Path, step: int, state: TrainingState, rank_state: dict, shared: dict, keep_last: int,
                    d: parallel.Dist, write_files=None) -> Path:
    """Every rank calls this. `rank_state`: this rank's data position and RNG; `shared`: state all
    ranks hold alike (rank 0's is written); `write_files(folder)`: rank 0 adds the side files."""
    root = out / "checkpoints"
    folder, part = root / f"step-{step:07d}", root / f".step-{step:07d}.partial"
    if d.main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(part, ignore_errors=True)
    parallel.barrier()
    with quiet_dcp():
        dcp.save({"train": state}, storage_writer=dcp.FileSystemWriter(part))
    ranks = parallel.all_gather_objects(rank_state, d)
    if d.main:
        with open(part / TRAINER_FILE, "wb") as f:
            torch.save({**shared, "step": step, "ranks": ranks}, f)
            f.flush()
            os.fsync(f.fileno())
        if write_files is not None:
            write_files(part)
        publish(part, folder)
        for old in checkpoints(out)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    parallel.barrier()
    return folder


def _attempt(what, d: parallel.Dist) -> tuple[object, str]:
    """Run `what()` on every rank; (its result, "") if it worked on all, else (None, the problem).
    Every rank then knows the same outcome, so none goes on to a collective the others skip."""
    result, problem = None, ""
    try:
        result = what()
    except (Exception, dcp.CheckpointException) as e:  # what a damaged file raises varies (zip, pickle, DCP's)
        problem = " ".join(str(e).split())[:300] or type(e).__name__
    if parallel.all_sum(1 if problem else 0, d) and not problem:
        problem = "fails on another rank"
    return (None, problem) if problem else (result, "")


def _load_shards(path: Path, state: TrainingState) -> None:
    with quiet_dcp():
        dcp.load({"train": state}, storage_reader=dcp.FileSystemReader(path))


def resume(out: Path, state: TrainingState, d: parallel.Dist) -> tuple[Path | None, dict | None]:
    """Load model, optimizer and EMA in place (each rank its shards) from the newest checkpoint that
    loads, and return it with its trainer.pt; (None, None) when there is none. Newer ones that did
    not load are renamed `*.corrupt` once an older one has (a config that fits none renames nothing)."""
    found, failed, problems = checkpoints(out), [], []
    for path in reversed(found):
        trainer, problem = _attempt(lambda: torch.load(path / TRAINER_FILE, map_location="cpu", weights_only=True), d)
        if not problem:
            _, problem = _attempt(lambda: _load_shards(path, state), d)
        if not problem:
            if d.main:
                for bad in failed:
                    aside = bad.with_name(bad.name + ".corrupt")
                    shutil.rmtree(aside, ignore_errors=True)
                    os.replace(bad, aside)
            parallel.barrier()
            return path, trainer
        problems.append(f"{path.name}: {problem}")
        if d.main:
            log.warning("checkpoint %s does not load (%s): trying the one before", path, problem)
        failed.append(path)
    if found:
        raise UserError(f"out: no checkpoint in {out / 'checkpoints'} loads ({problems[0]}); "
                        "did a config change the model since? Fix it, or use another out=")
    return None, None
