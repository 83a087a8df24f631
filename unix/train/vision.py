"""Stage 0 for new image domains: pre-train the vision tower (the phantom set's stand-in for SigLIP).

    unix train-vision --shards data/phantom --out runs/phantom/vision --preset phantom

UniX starts its understanding stage from a vision encoder that has already seen millions of images
(SigLIP, inside Janus-Pro). A demo model trained from scratch on a few thousand phantom images has
no such encoder, and a ViT learning to see only through the report loss learns slowly. This stage
gives it one: the model's own `SiglipVisionTower` plus a linear probe on the mean patch feature,
trained to predict the 14 CheXpert labels of each training image (uncertain counts as present).
Only the tower is kept (`vision.safetensors`, the tower's own tensor names); stage 1 starts from it
with `vision=PATH`. Validation micro-F1 of the probe goes to `vision.json`.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from unix.config import VisionConfig, load_model_config
from unix.data.dataset import RowStream, decode_gray
from unix.errors import UserError
from unix.eval.chexpert import CHEXPERT_FINDINGS
from unix.models.vision import SiglipVisionTower, normalize_pixels

log = logging.getLogger(__name__)
VISION_FILE = "vision.safetensors"


@dataclass
class VisionTrainSettings:
    shards: str
    out: str
    preset: str = "phantom"
    overrides: tuple[str, ...] = ()
    steps: int = 3000
    batch_size: int = 32
    lr: float = 1e-3
    seed: int = 0
    pool: str = "mean"  # probe pooling (see Probe)


POOLS = ("mean", "meanmax")


class Probe(nn.Module):
    """Tower + linear head on pooled patch features. "mean" pools by averaging; "meanmax" also
    takes the per-channel maximum over patches, so a finding in one patch (a nodule, a device)
    can decide a label on its own instead of having to move the average of all 64."""

    def __init__(self, cfg: VisionConfig, pool: str = "mean"):
        super().__init__()
        if pool not in POOLS:
            raise UserError(f"vision probe: pool must be one of {', '.join(POOLS)}, got {pool!r}")
        self.pool = pool
        self.tower = SiglipVisionTower(cfg)
        self.head = nn.Linear(cfg.width * (2 if pool == "meanmax" else 1), len(CHEXPERT_FINDINGS))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.tower(pixels)
        pooled = x.mean(dim=1) if self.pool == "mean" else torch.cat([x.mean(dim=1), x.amax(dim=1)], dim=-1)
        return self.head(pooled)


def row_targets(row: dict) -> list[float]:
    return [1.0 if row.get(f) in (1, -1, 1.0, -1.0) else 0.0 for f in CHEXPERT_FINDINGS]


class DecodedImages:
    """Decoded images by row id, kept as uint8 up to `max_bytes`: decoding a PNG costs about as
    much as a training step of the small tower, and the stage sees every image many times."""

    def __init__(self, size: int, max_bytes: int = 1 << 30):
        self.size, self.room = size, max_bytes // (size * size)
        self.images: dict[str, torch.Tensor] = {}

    def __call__(self, row: dict) -> torch.Tensor:
        key = row.get("id")
        if key in self.images:
            return self.images[key].float() / 255.0
        image = decode_gray(row.get("image"), self.size, fill=1.0)  # white letterbox, as inference
        if key is not None and len(self.images) < self.room:
            self.images[key] = (image * 255.0).round().to(torch.uint8)
            return self.images[key].float() / 255.0  # cached or not, a row gives the same pixels
        return (image * 255.0).round() / 255.0


def _batch(stream: RowStream, cfg: VisionConfig, n: int, decode: DecodedImages | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    decode = decode or DecodedImages(cfg.image_size, max_bytes=0)
    pairs = [stream.next_item(lambda row: (decode(row), row_targets(row))) for _ in range(n)]  # unreadable rows skipped
    return normalize_pixels(torch.stack([x for x, _ in pairs]), cfg), torch.tensor([y for _, y in pairs])


@torch.no_grad()
def probe_scores(model: Probe, shards: str, cfg: VisionConfig, split: str = "val", limit: int = 600) -> dict | None:
    """Micro-F1 of the probe over the 14 labels, and F1 of each label (None where it has no positives
    and no predictions)."""
    try:
        stream = RowStream(shards, split, 0)
    except UserError:
        return None
    n = min(limit, sum(stream.counts))
    model.eval()
    x, y = _batch(stream, cfg, n)
    pred = torch.cat([model(x[i:i + 128]) for i in range(0, n, 128)]) > 0
    tp, fp, fn = (pred & (y > 0)).sum(0), (pred & (y == 0)).sum(0), (~pred & (y > 0)).sum(0)

    def f1(tp, fp, fn):
        return round(float(tp / (tp + (fp + fn) / 2)), 4) if tp + fp + fn else None

    return {"micro_f1": f1(tp.sum(), fp.sum(), fn.sum()),
            "f1": {name: f1(*c) for name, c in zip(CHEXPERT_FINDINGS, zip(tp, fp, fn))}}


def train_vision(s: VisionTrainSettings) -> dict:
    cfg = load_model_config(s.preset, list(s.overrides)).vision
    torch.manual_seed(s.seed)
    model = Probe(cfg, s.pool).train()
    stream = RowStream(s.shards, "train", s.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=0.05)
    warm = max(1, s.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: (i + 1) / warm if i < warm else 0.5 * (1 + math.cos(math.pi * (i - warm) / max(1, s.steps - warm))))
    loss_fn = nn.BCEWithLogitsLoss()
    decode = DecodedImages(cfg.image_size)
    bar = tqdm(range(s.steps), desc="train vision", unit="step")
    for _ in bar:
        x, y = _batch(stream, cfg, s.batch_size, decode)
        loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    val = probe_scores(model, s.shards, cfg) or {}
    stats = {"loss": loss.item(), "val_micro_f1": val.get("micro_f1"), "val_f1": val.get("f1"), "preset": s.preset,
             "overrides": list(s.overrides), "pool": s.pool, "steps": s.steps}
    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (VISION_FILE + ".tmp")
    save_file({k: v.contiguous() for k, v in model.tower.state_dict().items()}, str(tmp))
    tmp.replace(out / VISION_FILE)
    (out / "vision.json").write_text(json.dumps(stats, indent=1))
    return stats


def load_vision_tower(tower: SiglipVisionTower, path: str | Path) -> None:
    """Start a model's tower from `train-vision` output; shapes must match the model's preset."""
    state = load_file(str(path))
    own = tower.state_dict()
    wrong = sorted(k for k in own if k not in state or state[k].shape != own[k].shape)
    extra = sorted(k for k in state if k not in own)
    if wrong or extra:
        raise UserError(f"vision: {path} does not fit this model's vision tower "
                        f"(missing or other shape: {wrong[:3]}, unexpected: {extra[:3]})")
    tower.load_state_dict(state)
    log.info("vision tower initialised from %s", path)
