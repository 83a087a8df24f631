"""CXR-Phantom classifier: a small CNN (~0.6M parameters) with one sigmoid per CheXpert observation,
trained on generated phantom images only. Two uses in evaluation: `features()` (pooled penultimate
activations) as the feature space for FD/KD/PRDC on phantom data (`unix eval images --features
phantom`), and `predict()` to read findings off generated images (finding agreement with prompts).

A weights folder (`weights/phantom-classifier/`) holds `model.safetensors` and `config.json`
(architecture, label order, how it was trained, held-out AUROC). Loading is strict.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from unix.data.phantom import LABELS
from unix.errors import UserError

FOLDER_NAME = "phantom-classifier"  # inside the weights root, next to rad-dino/
PIXEL_MEAN, PIXEL_STD = 0.5, 0.25  # fixed input normalisation of [0, 1] pixels


@dataclass
class ClassifierConfig:
    input_size: int = 128  # images are resized (bilinear) to input_size x input_size
    channels: tuple[int, ...] = (16, 32, 64, 96, 160)  # stem, then one stride-2 block per further entry
    labels: tuple[str, ...] = field(default_factory=lambda: tuple(LABELS))  # output order

    @property
    def feature_dim(self) -> int:
        return self.channels[-1]


def _block(c_in: int, c_out: int) -> nn.Sequential:
    """Two 3x3 convolutions, the first with stride 2: (B, c_in, H, W) -> (B, c_out, H/2, W/2)."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, 2, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
    )


class PhantomClassifier(nn.Module):
    def __init__(self, cfg: ClassifierConfig):
        super().__init__()
        self.cfg = cfg
        c = cfg.channels
        self.stem = nn.Sequential(nn.Conv2d(1, c[0], 3, 2, 1, bias=False), nn.BatchNorm2d(c[0]), nn.ReLU(inplace=True))
        self.blocks = nn.Sequential(*[_block(a, b) for a, b in zip(c[:-1], c[1:])])
        self.head = nn.Linear(c[-1], len(cfg.labels))

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 1|3, H, W) uint8 in [0, 255] or float in [0, 1] -> normalised (B, 1, S, S) float."""
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected (B, 1|3, H, W) images, got {tuple(images.shape)}")
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        x = x.mean(dim=1, keepdim=True)  # RGB copies of a grayscale radiograph -> one channel
        s = self.cfg.input_size
        if x.shape[-2:] != (s, s):
            x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
        return (x - PIXEL_MEAN) / PIXEL_STD

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features (B, feature_dim): globally average-pooled last block."""
        x = self.blocks(self.stem(self.prepare(images)))  # (B, C, S/32, S/32)
        return x.mean(dim=(2, 3))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits (B, len(labels)); sigmoid gives the probability that each finding is in the image."""
        return self.head(self.features(images))


# --- weights folder -----------------------------------------------------------------------------------

def save_classifier(model: PhantomClassifier, folder: str | Path, info: dict | None = None) -> Path:
    """Write model.safetensors + config.json into a temporary sibling folder, then swap it in."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, tmp / "model.safetensors")
        config = {"architecture": "phantom-classifier", **asdict(model.cfg), "info": info or {}}
        (tmp / "config.json").write_text(json.dumps(config, indent=1) + "\n")
        for p in tmp.iterdir():
            p.chmod(0o644)  # safetensors writes 0600; weights are meant to be shared
        old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
        if folder.exists():
            os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def load_classifier(folder: str | Path, device: str | torch.device = "cpu") -> PhantomClassifier:
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
        raise UserError(f"{folder}: not a phantom classifier folder (needs config.json and model.safetensors; "
                        "train one with scripts/train_phantom_classifier.py)")
    raw = json.loads((folder / "config.json").read_text())
    if raw.get("architecture") != "phantom-classifier":
        raise UserError(f"{folder}/config.json: architecture is {raw.get('architecture')!r}, not 'phantom-classifier'")
    cfg = ClassifierConfig(input_size=int(raw["input_size"]), channels=tuple(raw["channels"]), labels=tuple(raw["labels"]))
    if cfg.labels != tuple(LABELS):
        raise UserError(f"{folder}: label order {cfg.labels} differs from the CheXpert order this build uses")
    model = PhantomClassifier(cfg)
    state = load_file(folder / "model.safetensors")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"{folder}/model.safetensors does not match config.json: missing {missing}, unexpected {unexpected}")
    return model.eval().to(device)


class PhantomExtractor:
    """The `unix.eval.features` extractor protocol: images -> (B, feature_dim) float32 on CPU."""

    name = "phantom"

    def __init__(self, model: PhantomClassifier, device: torch.device):
        self.model, self.device, self.input_size = model.eval().to(device), torch.device(device), model.cfg.input_size

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.features(images.to(self.device)).float().cpu()

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """(B, len(labels)) probabilities; threshold at 0.5 for CheXpert-style 1/0 labels."""
        return torch.sigmoid(self.model(images.to(self.device))).float().cpu()


def load_extractor(weights_dir: str | Path, device: str | torch.device = "cpu") -> PhantomExtractor:
    """`weights_dir` is the weights root; the classifier lives in weights_dir/phantom-classifier/."""
    return PhantomExtractor(load_classifier(Path(weights_dir) / FOLDER_NAME, device), torch.device(device))


# --- training and held-out evaluation -----------------------------------------------------------------

def auroc(scores: np.ndarray, targets: np.ndarray) -> float | None:
    """Area under the ROC curve (Mann-Whitney, ties averaged); None when one class is absent."""
    targets = np.asarray(targets, bool)
    n_pos, n_neg = int(targets.sum()), int((~targets).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = np.asarray(scores)[order]
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    ranks[order] = np.repeat(first + (counts + 1) / 2.0, counts)  # average 1-based rank within ties
    return float((ranks[targets].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def phantom_arrays(seed: int, start: int, n: int, gen_size: int, input_size: int, progress: bool = True):
    """Images start..start+n-1 of the phantom data set `seed`: (n, 1, S, S) uint8 drawn at gen_size and
    resized like the evaluation loader (PIL bilinear), and (n, 14) float targets: 1 where the finding
    is in the image (reported positive or hedged; No Finding when nothing else is), else 0."""
    from PIL import Image
    from tqdm import tqdm

    from unix.data.phantom import generate

    images = np.empty((n, 1, input_size, input_size), np.uint8)
    targets = np.zeros((n, len(LABELS)), np.float32)
    for i in tqdm(range(n), desc=f"phantom seed {seed}", unit="img", disable=not progress, leave=False):
        s = generate(seed, start + i, gen_size)
        img = Image.fromarray(s.image)
        if gen_size != input_size:
            img = img.resize((input_size, input_size), Image.BILINEAR)
        images[i, 0] = np.asarray(img)
        targets[i] = [1.0 if v in (1.0, -1.0) else 0.0 for v in s.labels.values()]
    return torch.from_numpy(images), torch.from_numpy(targets)


@torch.no_grad()
def evaluate(model: PhantomClassifier, images: torch.Tensor, targets: torch.Tensor, batch_size: int = 256) -> dict:
    model.eval()
    probs = torch.cat([torch.sigmoid(model(images[i:i + batch_size])) for i in range(0, len(images), batch_size)]).numpy()
    per = {name: auroc(probs[:, j], targets[:, j].numpy()) for j, name in enumerate(model.cfg.labels)}
    defined = [v for v in per.values() if v is not None]
    return {"auroc": per, "mean_auroc": float(np.mean(defined)) if defined else None, "n": len(images)}


def train(model: PhantomClassifier, images: torch.Tensor, targets: torch.Tensor, epochs: int, batch_size: int = 64,
          lr: float = 2e-3, weight_decay: float = 1e-4, seed: int = 0, log=print) -> list[float]:
    """AdamW, warm-up then cosine over `epochs` passes; returns the mean loss of each epoch."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * math.ceil(len(images) / batch_size)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up, then cosine to zero
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1.0 + math.cos(math.pi * min(s, steps) / steps)))
    losses, start = [], time.time()
    for epoch in range(epochs):
        model.train()
        order, total = torch.randperm(len(images), generator=gen), 0.0
        for i in range(0, len(images), batch_size):
            idx = order[i:i + batch_size]
            loss = F.binary_cross_entropy_with_logits(model(images[idx]), targets[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        losses.append(total / len(images))
        log(f"epoch {epoch + 1}/{epochs}: loss {losses[-1]:.4f} ({time.time() - start:.0f} s)")
    return losses
