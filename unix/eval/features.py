"""Feature extractors for image metrics, pluggable by name.

An extractor maps a batch of images to one feature vector per image:

    extractor(images)  # (B, 1|3, H, W) uint8 in [0, 255] or float in [0, 1]  ->  (B, D) float32 on CPU

`get_extractor(name, weights_dir)` builds one: "raddino" (RAD-DINO CLS features, the paper's
FD/KD-RadDino) or "phantom" (the CXR-Phantom classifier, `unix.eval.phantom_classifier`, whose module
provides `load_extractor(weights_dir, device) -> FeatureExtractor`). `load_image` reads a file into the
pixels the extractors see, as the authors' metric script does.
"""

from __future__ import annotations

import importlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Protocol

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from unix.errors import UserError

log = logging.getLogger(__name__)

REFERENCE_INPUT_SIZE = 299  # CheXGenBench resizes every image to 299x299 (bilinear, uint8) before any feature model


class FeatureExtractor(Protocol):
    name: str
    input_size: int  # images are resized to input_size x input_size before batching
    device: torch.device

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError:
        raise UserError(f"unknown device {device!r} (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device} asked for, but CUDA is not available")
    return device


def extract_features(
    extractor: FeatureExtractor,
    images: Iterable[torch.Tensor],
    batch_size: int = 32,
    total: int | None = None,
    desc: str = "features",
) -> np.ndarray:
    """Run `extractor` over an iterable of (C, H, W) images of one size, `batch_size` at a time.
    Returns (N, D) float32; N = 0 gives an empty (0, 0) array."""
    chunks, batch = [], []
    with tqdm(total=total, desc=desc, unit="img", leave=False) as bar:
        for image in images:
            batch.append(image)
            if len(batch) == batch_size:
                chunks.append(extractor(torch.stack(batch)).float().cpu().numpy())
                bar.update(len(batch))
                batch = []
        if batch:
            chunks.append(extractor(torch.stack(batch)).float().cpu().numpy())
            bar.update(len(batch))
    return np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32)


def load_image(path: Path, size: int, released_round_trip: bool = False, reader: str = "authors") -> torch.Tensor:
    """(3, size, size) uint8: the file's pixels resized with PIL's bilinear filter (antialiased when
    shrinking), as torchvision `Resize((size, size))` does on a PIL image.

    `reader` "authors" (the release protocol) reads the file as CheXGenBench's metrics/fid.py does:
    PIL `convert("RGB")`, which clips a 16-bit image to white and reads no DICOM. "unix" (the exact
    protocol, finding agreement) uses the project's reader (`unix.infer.io.read_image`: every bit
    depth by its real range, DICOM, float TIFF), rounded to 8 bits and repeated on three channels;
    for an 8-bit gray file both give the same bytes, for a colour file "unix" gives its luma.

    `released_round_trip` adds the rest of the authors' path: `ToTensor` (float32 / 255), `* 255`
    and a truncating cast to uint8. Truncation could turn k into k - 1, but in IEEE float32
    (k / 255) * 255 rounds back to exactly k for all 256 levels (also with the reciprocal multiply
    CUDA uses for a scalar division), so both settings give the same bytes; the release protocol
    keeps the step anyway, so that it does what the authors did rather than what we proved equal."""
    if reader == "unix":
        from unix.infer.io import read_image

        img = Image.fromarray(np.round(read_image(path) * 255).astype(np.uint8), mode="L").convert("RGB")
    elif reader == "authors":
        with Image.open(path) as file:
            img = file.convert("RGB")
    else:
        raise ValueError(f"reader must be 'authors' or 'unix', got {reader!r}")
    img = img.resize((size, size), Image.BILINEAR)
    pixels = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)  # (3, H, W)
    if released_round_trip:
        pixels = (pixels.to(torch.float32).div(255) * 255).to(torch.uint8)
    return pixels


# --- RAD-DINO ---------------------------------------------------------------------------------------

# microsoft/rad-dino's preprocessor_config.json (a BitImageProcessor): image_mean and image_std, the same
# for the three channels (its own MIMIC-CXR statistics, not ImageNet's), shortest edge 518, bicubic,
# centre crop 518. Used when a RAD-DINO folder has no preprocessor_config.json.
RAD_DINO_MEAN = (0.5307, 0.5307, 0.5307)
RAD_DINO_STD = (0.2583, 0.2583, 0.2583)
RAD_DINO_SIZE = 518
RESCALE_FACTOR = 1 / 255  # BitImageProcessor rescale_factor (0.00392156862745098)
PIL_BILINEAR, PIL_BICUBIC = 2, 3  # PIL resample codes as stored in preprocessor_config.json


def _filter(resample: int) -> tuple[Callable[[torch.Tensor], torch.Tensor], float]:
    """PIL's resampling kernels and their support (bicubic uses a = -0.5, unlike torch's -0.75)."""
    if resample == PIL_BILINEAR:
        return (lambda x: (1 - x.abs()).clamp(min=0)), 1.0
    if resample == PIL_BICUBIC:
        a = -0.5

        def cubic(x: torch.Tensor) -> torch.Tensor:
            x = x.abs()
            near = ((a + 2) * x - (a + 3)) * x * x + 1
            far = (((x - 5) * x + 8) * x - 4) * a
            return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))

        return cubic, 2.0
    raise UserError(f"preprocessor resample={resample} is not supported (2 bilinear, 3 bicubic)")


def resample_matrix(in_size: int, out_size: int, resample: int) -> torch.Tensor:
    """(out, in) weights of PIL's separable resize along one axis (antialiased when shrinking)."""
    kernel, support = _filter(resample)
    scale = in_size / out_size
    stretch = max(scale, 1.0)
    centers = (torch.arange(out_size, dtype=torch.float64) + 0.5) * scale  # in input pixel units
    src = torch.arange(in_size, dtype=torch.float64) + 0.5
    w = kernel((src[None, :] - centers[:, None]) / stretch)
    w = torch.where((src[None, :] - centers[:, None]).abs() < support * stretch, w, torch.zeros_like(w))
    return w / w.sum(1, keepdim=True)


@dataclass
class DinoPreprocess:
    """The Hugging Face BitImageProcessor of microsoft/rad-dino: resize the shortest side, centre crop,
    rescale to [0, 1], normalise. uint8 images take the processor's own path (PIL resize of the uint8
    image, float64 rescale cast to float32, float32 normalisation), so they give its pixel values
    exactly; float images in [0, 1] (REPA targets, differentiable inputs) are resized in torch with the
    same PIL kernels, without uint8 rounding."""

    shortest_edge: int = RAD_DINO_SIZE
    crop_height: int | None = RAD_DINO_SIZE  # None: no centre crop
    crop_width: int | None = RAD_DINO_SIZE
    resample: int = PIL_BICUBIC
    mean: tuple[float, ...] = RAD_DINO_MEAN
    std: tuple[float, ...] = RAD_DINO_STD
    rescale_factor: float = RESCALE_FACTOR

    @classmethod
    def from_folder(cls, folder: Path) -> "DinoPreprocess":
        path = folder / "preprocessor_config.json"
        if not path.is_file():
            log.warning("%s: no preprocessor_config.json; using microsoft/rad-dino's values (mean %s, std %s, "
                        "shortest edge %d bicubic, centre crop %d)", folder, RAD_DINO_MEAN[0], RAD_DINO_STD[0], RAD_DINO_SIZE, RAD_DINO_SIZE)
            return cls()
        try:
            cfg = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: not valid JSON ({e})") from None
        size, crop = cfg.get("size", {}), cfg.get("crop_size", {})
        edge = size.get("shortest_edge", cls.shortest_edge) if isinstance(size, dict) else int(size)
        if not cfg.get("do_center_crop", True):
            crop = {"height": None, "width": None}
        return cls(
            shortest_edge=edge,
            crop_height=crop.get("height", cls.crop_height),
            crop_width=crop.get("width", cls.crop_width),
            resample=cfg.get("resample", cls.resample),
            mean=tuple(cfg.get("image_mean", cls.mean)),
            std=tuple(cfg.get("image_std", cls.std)),
            rescale_factor=cfg.get("rescale_factor", cls.rescale_factor),
        )

    def _resized_size(self, H: int, W: int) -> tuple[int, int]:
        short, long = (H, W) if H <= W else (W, H)
        new_long = int(self.shortest_edge * long / short)
        return (self.shortest_edge, new_long) if H <= W else (new_long, self.shortest_edge)

    def _resize_uint8(self, images: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
        """PIL's resize of each uint8 image, as the processor does (channels resized independently)."""
        out = []
        for image in images.cpu().numpy():  # (C, H, W)
            mode = "RGB" if image.shape[0] == 3 else "L"
            pil = Image.fromarray(image.transpose(1, 2, 0) if mode == "RGB" else image[0], mode=mode)
            resized = np.asarray(pil.resize((out_w, out_h), resample=self.resample, reducing_gap=None))
            out.append(resized.transpose(2, 0, 1) if mode == "RGB" else resized[None])
        return torch.from_numpy(np.stack(out)).to(images.device)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 1|3, H, W) uint8 or float in [0, 1] -> (B, 3, crop_h, crop_w) float32, normalised."""
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"images must be (B, 1|3, H, W), got {tuple(images.shape)}")
        out_h, out_w = self._resized_size(*images.shape[-2:])
        if images.dtype == torch.uint8:
            x = self._resize_uint8(images, out_h, out_w).expand(-1, 3, -1, -1)
        else:
            rh = resample_matrix(images.shape[-2], out_h, self.resample).to(images.device)
            rw = resample_matrix(images.shape[-1], out_w, self.resample).to(images.device)
            x = rh @ images.expand(-1, 3, -1, -1).double() @ rw.T
        if self.crop_height is not None:
            top, left = (out_h - self.crop_height) // 2, (out_w - self.crop_width) // 2
            x = x[..., top : top + self.crop_height, left : left + self.crop_width]
        if images.dtype == torch.uint8:
            x = (x.double() * self.rescale_factor).float()  # the processor rescales in float64, then casts
        else:
            x = x.float()
        mean = torch.tensor(self.mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std


class RadDinoExtractor:
    """microsoft/rad-dino features: the CLS token of the last hidden state after the final
    LayerNorm (what Dinov2Model returns as `pooler_output`, 768-d for the released model)."""

    name = "raddino"
    input_size = REFERENCE_INPUT_SIZE

    def __init__(self, folder: str | Path, device: str | torch.device = "auto"):
        from transformers import Dinov2Model  # imported here: `unix eval --help` should not pay for it

        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise UserError(f"{folder}: no RAD-DINO model there; put microsoft/rad-dino in weights/rad-dino/")
        self.device = resolve_device(device)
        self.preprocess = DinoPreprocess.from_folder(folder)
        try:
            self.model = Dinov2Model.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError) as e:
            raise UserError(f"{folder}: cannot load the RAD-DINO model ({e})") from None
        self.model.eval().to(self.device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        pixels = self.preprocess(images.cpu()).to(self.device)  # the processor resizes with PIL, on the CPU
        hidden = self.model(pixel_values=pixels).last_hidden_state  # (B, 1 + registers + patches, D)
        return hidden[:, 0].float().cpu()


# --- registry -----------------------------------------------------------------------------------------

ExtractorFactory = Callable[[Path, torch.device], FeatureExtractor]


def _raddino(weights_dir: Path, device: torch.device) -> FeatureExtractor:
    return RadDinoExtractor(weights_dir / "rad-dino", device)


def _phantom(weights_dir: Path, device: torch.device) -> FeatureExtractor:
    try:
        module = importlib.import_module("unix.eval.phantom_classifier")
    except ModuleNotFoundError as e:
        if e.name != "unix.eval.phantom_classifier":
            raise
        raise UserError("the phantom feature extractor is not available in this build (unix.eval.phantom_classifier is missing)") from None
    return module.load_extractor(weights_dir, device)


EXTRACTORS: dict[str, ExtractorFactory] = {"raddino": _raddino, "phantom": _phantom}


def register_extractor(name: str, factory: ExtractorFactory) -> None:
    """Make `factory(weights_dir, device)` available to `get_extractor` and `unix eval images --features`."""
    EXTRACTORS[name] = factory


def get_extractor(name: str, weights_dir: str | Path = "weights", device: str | torch.device = "auto") -> FeatureExtractor:
    if name not in EXTRACTORS:
        raise UserError(f"unknown feature extractor {name!r}; known: {', '.join(sorted(EXTRACTORS))}")
    return EXTRACTORS[name](Path(weights_dir), resolve_device(device))
