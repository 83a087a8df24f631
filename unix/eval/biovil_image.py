"""BioViL-T's image side, as hi-ml-multimodal 0.2.2 runs it for one image: read, resize and crop,
a ResNet-50 trunk, the temporal encoder's 1x1 reduction joined with its "no previous image"
embedding, and the projection head, averaged over the patch grid into one joint-space vector.

    biovil_t_image_model_proj_size_128.pt   (HF microsoft/BiomedVLP-BioViL-T, a flat state dict)

hi-ml's MultiImageEncoder runs its ViT pooler only when a previous image is given; for a single
image it uses the learned `missing_previous_emb` in its place. So the pooler's tensors are read
and checked here but never run (see UNUSED_PREFIXES). No torchvision: the trunk is written below
with torchvision's ResNet-50 layout (stride on the 3x3 conv, "v1.5") and its tensor names.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from unix.errors import UserError

IMAGE_WEIGHTS_FILE = "biovil_t_image_model_proj_size_128.pt"  # hi-ml BIOVIL_T_IMAGE_WEIGHTS_NAME
RESIZE = 512  # hi-ml image/utils.py TRANSFORM_RESIZE: shorter side, bilinear
CROP = 448  # hi-ml get_image_inference(BIOVIL_T): centre crop; 448 / 32 = the 14x14 patch grid
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")  # hi-ml load_image reads these with skimage (imageio + Pillow)
RESNET50_DEPTHS = (3, 4, 6, 3)  # hi-ml always builds resnet50 for BioViL-T
EXPANSION = 4  # bottleneck output channels = 4 x its width (torchvision Bottleneck.expansion)
BN_EPS = 1e-5  # torch.nn.BatchNorm2d default, used by torchvision and hi-ml's projector
IMAGENET_CLASSES = 1000  # torchvision's ResNet keeps its (unused) ImageNet classifier in the file
POOLER_BLOCKS = 3  # hi-ml VisionTransformerPooler(num_blocks=3): unused for single images


# --- reading and preprocessing ----------------------------------------------------------------------


def stretch_to_uint8(pixels: np.ndarray) -> np.ndarray:
    """hi-ml `remap_to_uint8` without percentiles: min -> 0, max -> 255, truncated to uint8, in
    float64 and in this order so that the truncation lands on the same integers. One min/max for
    all channels (alpha included). A constant image becomes all zeros: hi-ml computes 0/0 there and
    NumPy casts the NaNs to 0 on x86; we write the zeros explicitly."""
    x = pixels.astype(np.float64)
    x -= x.min()
    top = x.max()
    if top == 0:
        return np.zeros(pixels.shape, np.uint8)
    x /= top
    x *= 255
    return x.astype(np.uint8)


def read_image(path: str | Path) -> Image.Image:
    """An image file as hi-ml's `load_image` gives it: the decoded array (palette images expanded,
    as imageio does; 16-bit PNGs stay 16-bit), stretched to 0..255, then Pillow's "L" conversion
    (ITU-R 601 luma for RGB, alpha dropped). hi-ml accepts only lower-case suffixes; we accept any
    case. Raises OSError/ValueError for unreadable files."""
    path = Path(path)
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise ValueError(f"not a PNG or JPEG file name ({path.suffix or 'no suffix'})")
    with Image.open(path) as img:
        img.load()
        pixels = np.asarray(img.convert(img.palette.mode) if img.mode == "P" else img)
    return Image.fromarray(stretch_to_uint8(pixels)).convert("L")


def resized_size(width: int, height: int, shorter: int = RESIZE) -> tuple[int, int]:
    """torchvision Resize(int): the shorter side becomes `shorter`, the longer one is truncated."""
    if width <= height:
        return shorter, int(shorter * height / width)
    return int(shorter * width / height), shorter


def preprocess(img: Image.Image, resize: int = RESIZE, crop: int = CROP) -> torch.Tensor:
    """hi-ml's inference transform: Resize(512) (Pillow bilinear), CenterCrop(448), ToTensor, three
    channels. No mean/std normalisation. Returns (3, crop, crop) float32 in [0, 1]."""
    if img.mode != "L":
        raise ValueError(f"expected a single-channel image, got mode {img.mode}")
    size = resized_size(*img.size, resize)
    if size != img.size:
        img = img.resize(size, Image.BILINEAR)
    W, H = img.size
    # torchvision center_crop: offsets int(round(...)), Python's round (halves go to even)
    top, left = int(round((H - crop) / 2.0)), int(round((W - crop) / 2.0))
    img = img.crop((left, top, left + crop, top + crop))
    x = torch.from_numpy(np.array(img, dtype=np.uint8)).float().div(255)  # (crop, crop)
    return x.unsqueeze(0).expand(3, -1, -1).contiguous()  # (3, crop, crop)


def load_pixels(path: str | Path) -> torch.Tensor:
    return preprocess(read_image(path))


# --- the model ----------------------------------------------------------------------------------------


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carries the stride), 1x1 expand, each with BatchNorm; residual, ReLU."""

    def __init__(self, in_ch: int, width: int, stride: int):
        super().__init__()
        out_ch = width * EXPANSION
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width, eps=BN_EPS)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width, eps=BN_EPS)
        self.conv3 = nn.Conv2d(width, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch, eps=BN_EPS)
        self.downsample = None
        if stride != 1 or in_ch != out_ch:  # names `downsample.0` (conv) and `downsample.1` (norm)
            self.downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch, eps=BN_EPS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class ResNet50Trunk(nn.Module):
    """ResNet-50 up to its last stage: (B, 3, H, W) -> (B, 32 * width, H / 32, W / 32)."""

    def __init__(self, width: int = 64, depths: tuple[int, ...] = RESNET50_DEPTHS):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width, eps=BN_EPS)
        in_ch = width
        for stage, depth in enumerate(depths):
            w = width * 2**stage
            blocks = [Bottleneck(in_ch if i == 0 else w * EXPANSION, w, 2 if (stage > 0 and i == 0) else 1) for i in range(depth)]
            self.add_module(f"layer{stage + 1}", nn.Sequential(*blocks))
            in_ch = w * EXPANSION
        self.out_channels = in_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(x, 3, stride=2, padding=1)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


@dataclass(frozen=True)
class ImageEncoderConfig:
    width: int = 64  # ResNet stem channels (ResNet-50: 64, so the trunk ends with 2048)
    temporal_dim: int = 256  # hi-ml MultiImageEncoder output_dim: the 1x1 reduction and the "no prior" embedding
    joint_dim: int = 128  # hi-ml JOINT_FEATURE_SIZE: the joint image-text space


class BioViLImageEncoder(nn.Module):
    """Single-image BioViL-T: trunk -> 1x1 conv to temporal_dim, joined on channels with the learned
    "no previous image" embedding -> projector (1x1 conv, BN, ReLU, 1x1 conv) -> patch mean."""

    def __init__(self, cfg: ImageEncoderConfig = ImageEncoderConfig()):
        super().__init__()
        self.cfg = cfg
        self.trunk = ResNet50Trunk(cfg.width)
        self.reduce = nn.Conv2d(self.trunk.out_channels, cfg.temporal_dim, 1, bias=False)
        self.missing_previous = nn.Parameter(torch.zeros(1, cfg.temporal_dim, 1, 1))
        self.proj_in = nn.Conv2d(2 * cfg.temporal_dim, cfg.joint_dim, 1, bias=False)
        self.proj_norm = nn.BatchNorm2d(cfg.joint_dim, eps=BN_EPS)
        self.proj_out = nn.Conv2d(cfg.joint_dim, cfg.joint_dim, 1, bias=True)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, joint_dim) projected global embedding, not normalised."""
        patches = self.reduce(self.trunk(pixels))  # (B, temporal_dim, h, w)
        B, _, h, w = patches.shape
        fused = torch.cat([patches, self.missing_previous.expand(B, -1, h, w)], dim=1)  # (B, 2 * temporal_dim, h, w)
        projected = self.proj_out(F.relu(self.proj_norm(self.proj_in(fused))))  # (B, joint_dim, h, w)
        return projected.mean(dim=(2, 3))


# --- the checkpoint -------------------------------------------------------------------------------------

# Checkpoint prefix -> our prefix (hi-ml ImageModel names: encoder.encoder = torchvision ResNet,
# encoder.backbone_to_vit, encoder.missing_previous_emb, projector.model = Sequential(conv, BN, ReLU, conv)).
NAME_TABLE: list[tuple[str, str]] = [
    ("encoder.encoder.", "trunk."),
    ("encoder.backbone_to_vit.", "reduce."),
    ("encoder.missing_previous_emb", "missing_previous"),
    ("projector.model.0.", "proj_in."),
    ("projector.model.1.", "proj_norm."),
    ("projector.model.3.", "proj_out."),
]
# Tensors the file carries that single-image scoring never runs. They are still required, with
# their shapes, so that a wrong or truncated file cannot pass.
UNUSED_PREFIXES = {
    "encoder.encoder.fc.": "torchvision's ImageNet classifier; hi-ml's ResNet forward stops before it",
    "encoder.vit_pooler.": "the temporal ViT pooler; hi-ml runs it only when a previous image is given",
}


def unused_tensor_shapes(cfg: ImageEncoderConfig, trunk_channels: int) -> dict[str, tuple[int, ...]]:
    """hi-ml's names and shapes for the UNUSED_PREFIXES tensors (timm Mlp with ratio 1, no qkv bias)."""
    D = cfg.temporal_dim
    shapes = {"encoder.encoder.fc.weight": (IMAGENET_CLASSES, trunk_channels), "encoder.encoder.fc.bias": (IMAGENET_CLASSES,),
              "encoder.vit_pooler.type_embed": (2, 1, D), "encoder.vit_pooler.norm_post.weight": (D,), "encoder.vit_pooler.norm_post.bias": (D,)}
    for i in range(POOLER_BLOCKS):
        p = f"encoder.vit_pooler.blocks.{i}."
        for name in ("norm1", "norm2", "attn.proj", "mlp.fc1", "mlp.fc2"):
            shapes[p + name + ".bias"] = (D,)
        for name in ("norm1", "norm2"):
            shapes[p + name + ".weight"] = (D,)
        for name in ("attn.proj_q", "attn.proj_k", "attn.proj_v", "attn.proj", "mlp.fc1", "mlp.fc2"):
            shapes[p + name + ".weight"] = (D, D)
    return shapes


def checkpoint_name(ours: str) -> str:
    for theirs, mine in NAME_TABLE:
        if ours.startswith(mine):
            return theirs + ours[len(mine):]
    raise KeyError(f"no checkpoint name for {ours!r}")


def checkpoint_layout(model: BioViLImageEncoder) -> dict[str, tuple[int, ...]]:
    """Every tensor name and shape the released file must hold for this model, used or not."""
    layout = {checkpoint_name(k): tuple(v.shape) for k, v in model.state_dict().items()}
    layout.update(unused_tensor_shapes(model.cfg, model.trunk.out_channels))
    return layout


def config_from_checkpoint(state: dict[str, torch.Tensor], source: str) -> ImageEncoderConfig:
    """Read the channel sizes from three tensors; the depth is always ResNet-50's and every other
    tensor is then checked against these sizes."""
    keys = ("encoder.encoder.conv1.weight", "encoder.backbone_to_vit.weight", "projector.model.3.weight")
    absent = [k for k in keys if k not in state]
    if absent:
        raise UserError(f"{source}: not a BioViL-T image checkpoint (no {', '.join(absent)})")
    return ImageEncoderConfig(width=state[keys[0]].shape[0], temporal_dim=state[keys[1]].shape[0], joint_dim=state[keys[2]].shape[0])


def load_image_encoder(path: str | Path) -> tuple[BioViLImageEncoder, list[str]]:
    """Build the encoder from the released file and load it strictly. Returns (model in eval mode,
    names of the file's tensors that are checked but unused)."""
    from unix.weights.released import LoadReport

    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path}: cannot be read as a PyTorch state dict ({str(e).splitlines()[0]})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path}: expected a flat state dict of tensors (hi-ml's ImageModel.state_dict())")
    model = BioViLImageEncoder(config_from_checkpoint(state, str(path)))
    layout = checkpoint_layout(model)
    to_ours = {checkpoint_name(k): k for k in model.state_dict()}
    report, mapped = LoadReport(), {}
    report.missing = [name for name in layout if name not in state]
    report.unexpected = [name for name in state if name not in layout]
    for name, tensor in state.items():
        if name not in layout:
            continue
        if tuple(tensor.shape) != layout[name]:
            report.wrong_shape.append(f"{name}: file {list(tensor.shape)} vs model {list(layout[name])}")
        elif name.startswith(tuple(UNUSED_PREFIXES)):
            report.ignored.append(name)
        else:
            mapped[to_ours[name]] = tensor
    if not report.ok:
        raise UserError(f"{path}: does not fit the BioViL-T image model: {report.summary()}")
    model.load_state_dict(mapped, strict=True)
    return model.eval(), report.ignored
