"""Training metrics: console + OUT/metrics.jsonl always, a progress bar, wandb when enabled.
Only rank 0 logs."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from tqdm import tqdm

from unix.errors import UserError
from unix.infer.io import atomic_write

log = logging.getLogger(__name__)


class MetricsLogger:
    def __init__(self, out: Path, cfg, total: int, start: int, enabled: bool):
        self.enabled = enabled
        if not enabled:
            return
        path = out / "metrics.jsonl"
        drop_replayed(path, start)
        self.file = open(path, "a")
        self.bar = tqdm(total=total, initial=start, desc=f"train {cfg.stage}", unit="step", dynamic_ncols=True)
        self.wandb = None
        if cfg.logger == "wandb":
            try:
                import wandb
            except ImportError:
                raise UserError("logger=wandb needs the wandb package (pip install 'unix[wandb]')") from None
            self.wandb = wandb.init(project=cfg.wandb_project, dir=str(out), config={"stage": cfg.stage, "out": str(out)})

    def log(self, metrics: dict, every: int) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(metrics) + "\n")
        self.file.flush()
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
        if self.wandb is not None:
            self.wandb.log(metrics, step=metrics["step"])
        if metrics["step"] % every == 0:
            log.debug("step %d loss %.4f lr %.2e", metrics["step"], metrics["loss"], metrics["lr"])

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            self.file.close()
            if self.wandb is not None:
                self.wandb.finish()


def drop_replayed(path: Path, start: int) -> None:
    """Keep the lines of steps up to `start` only: a run resumed from step `start` trains and logs
    the later steps again, so their old lines would be duplicates (a line cut short by a crash goes too)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            continue
        if isinstance(step, int) and step <= start:
            kept.append(line + "\n")
    atomic_write(path, "".join(kept))
