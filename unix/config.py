"""Typed configuration: dataclass schemas, loaded from OmegaConf YAML files plus `key=value` overrides.

A YAML key that the schema does not declare is an error, and so is a value outside a closed set
(`Literal`). Every field says what it is; the defaults are the released UniX sizes.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from omegaconf import OmegaConf

from unix.errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration file or override that does not fit its schema."""


# ----------------------------------------------------------------------------------------------
# Schemas
# ----------------------------------------------------------------------------------------------


@dataclass
class LMConfig:
    """The decoder stack (Janus-Pro-1B language model sizes + UniX's q/k/v biases and QK-norm)."""

    vocab_size: int = 102400
    hidden_size: int = 2048
    intermediate_size: int = 5632  # SwiGLU inner width
    num_layers: int = 24
    num_heads: int = 16
    head_dim: int = 128
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    qk_norm: bool = True  # per-head RMSNorm on q and k before RoPE (weight shape [head_dim])
    qkv_bias: bool = True  # Qwen2-style biases on q/k/v (o_proj has none)
    max_position: int = 16384  # longest context (RoPE positions) the model is meant for

    def __post_init__(self) -> None:
        if self.num_heads * self.head_dim != self.hidden_size:
            raise ConfigError(
                f"lm: num_heads*head_dim ({self.num_heads}*{self.head_dim}) must equal hidden_size ({self.hidden_size})"
            )
        if self.head_dim % 2:
            raise ConfigError("lm.head_dim must be even (rotate-half RoPE)")


@dataclass
class VisionConfig:
    """SigLIP ViT (no class token, learned positions) and the MLP connector into the decoder."""

    image_size: int = 384  # the ViT takes exactly this square input
    patch_size: int = 16
    width: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_dim: int = 4096
    ln_eps: float = 1e-6
    # Janus' projector (what the weights were trained with) uses exact GELU; the reference
    # inference code runs tanh-GELU. Exact is the default; "gelu_tanh" is the compat switch.
    connector_act: Literal["gelu", "gelu_tanh"] = "gelu"
    image_mean: float = 0.555895  # chest-X-ray statistics of the released image processor
    image_std: float = 0.336385

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ConfigError("vision.image_size must be a multiple of vision.patch_size")
        if self.width % self.num_heads:
            raise ConfigError("vision.width must be divisible by vision.num_heads")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass
class VAEConfig:
    """KL autoencoder (LDM kl-f16 layout, built with diffusers' AutoencoderKL), frozen."""

    in_channels: int = 3
    latent_channels: int = 16
    block_out_channels: list[int] = field(default_factory=lambda: [128, 128, 256, 256, 512])
    layers_per_block: int = 2
    norm_num_groups: int = 32
    # z' = scale * (z - shift): the released VAE's latent normalisation.
    scale: float = 0.238092
    shift: float = -0.201906
    # Optional per-channel standardisation on top (EDM2-style; the release has none): z'_c is
    # further mapped to channel_scale[c] * (z'_c - channel_shift[c]). A small VAE's channels can
    # differ 10x in spread, and under one scale the quiet ones drown in the flow's unit noise
    # until the last steps. Empty lists (the default) leave z' as it is.
    channel_scale: list[float] = field(default_factory=list)
    channel_shift: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        for name in ("channel_scale", "channel_shift"):
            values = getattr(self, name)
            if values and len(values) != self.latent_channels:
                raise ConfigError(f"vae.{name} has {len(values)} values; vae.latent_channels is {self.latent_channels}")
        if bool(self.channel_scale) != bool(self.channel_shift):
            raise ConfigError("vae.channel_scale and vae.channel_shift go together: give both or neither")
        if any(c <= 0 for c in self.channel_scale):
            raise ConfigError("vae.channel_scale values must be positive")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


@dataclass
class GenConfig:
    """Generation-branch heads around the shared stack."""

    max_latent_size: int = 32  # token grid side of the sin-cos table (32 -> 512 px with kl-f16, patch 1)
    timestep_freq_dim: int = 256  # sinusoid width fed to the timestep MLP
    # p x p VAE latents make one token (BAGEL's knob; the release uses 1): p^2 fewer tokens per image
    latent_patch_size: int = 1
    # RoPE positions of latent tokens. "shared" (the release): every latent token of an image sits
    # at the image's one position, so only the sin-cos table added at the input says where it is.
    # "2d": the rotary frequencies are dealt round-robin to (sequence, row, column) axes and a
    # latent token at (y, x) sits at (r, r + y, r + x), so every layer's attention sees relative
    # offsets on the grid; text and ViT tokens keep (r, r, r), which is plain 1-D RoPE.
    latent_rope: Literal["shared", "2d"] = "shared"


@dataclass
class TokenConfig:
    """Special token ids of the Janus tokenizer as UniX uses them (reference section 3.2)."""

    bos: int = 100000  # start of every text segment; first token of a decoded report
    eos: int = 100001  # end of every text segment; decoding stops on it
    boi: int = 100003  # opens an image group (ViT or VAE)
    eoi: int = 100580  # closes an image group


@dataclass
class ModelConfig:
    """The whole UniX model."""

    name: str = "unix"
    lm: LMConfig = field(default_factory=LMConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    gen: GenConfig = field(default_factory=GenConfig)
    tokens: TokenConfig = field(default_factory=TokenConfig)
    # "auto": flash-attention varlen on CUDA when installed and computing in fp16/bf16, else SDPA
    # with a dense mask (a notice says once why flash was passed over).
    attn_backend: Literal["auto", "sdpa", "flex", "flash"] = "auto"
    # How inference runs its fixed-shape steps (a denoising step, a decoded token), see
    # unix/models/capture.py: "auto" = a CUDA graph on CUDA, eager elsewhere; "graph" (CUDA only);
    # "compile" = torch.compile(fullgraph=True) ("reduce-overhead" on CUDA); "eager" = as it is.
    step_capture: Literal["auto", "eager", "graph", "compile"] = "auto"

    @property
    def latent_stride(self) -> int:
        """Pixels along one side of a latent token: VAE downsampling x latent patch size."""
        return self.vae.downsample * self.gen.latent_patch_size

    @property
    def latent_token_dim(self) -> int:
        """Values in one latent token: C x p x p."""
        return self.vae.latent_channels * self.gen.latent_patch_size ** 2

    @property
    def max_image_size(self) -> int:
        """The largest image side the latent position table holds, in pixels."""
        return self.gen.max_latent_size * self.latent_stride

    def token_grid(self, size: int) -> int:
        """Side of the latent token grid of a size x size image; ValueError when there is none."""
        if size <= 0 or size % self.latent_stride:
            raise ValueError(f"size {size} is not a positive multiple of {self.latent_stride}")
        if size > self.max_image_size:
            raise ValueError(f"size {size} exceeds the model's latent table ({self.max_image_size} px at most)")
        return size // self.latent_stride

    def __post_init__(self) -> None:
        if self.gen.latent_patch_size < 1:
            raise ConfigError(f"gen.latent_patch_size={self.gen.latent_patch_size} must be at least 1")
        for name, tok in dataclasses.asdict(self.tokens).items():
            if not 0 <= tok < self.lm.vocab_size:
                raise ConfigError(f"tokens.{name}={tok} is outside the vocabulary (lm.vocab_size={self.lm.vocab_size})")


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def preset_path(kind: str, name: str) -> Path:
    """`configs/<kind>/<name>.yaml`, or `name` itself when it is a path to a YAML file."""
    p = Path(name)
    if p.suffix in (".yaml", ".yml"):
        return p
    return CONFIG_DIR / kind / f"{name}.yaml"


def load_config(schema: type, files: list[str | Path] = (), overrides: list[str] = ()) -> Any:
    """Merge YAML files then `a.b=value` overrides, and build `schema` strictly."""
    merged = OmegaConf.create({})
    for f in files:
        path = Path(f)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.load(path))
        except Exception as e:  # yaml syntax errors and the like
            raise ConfigError(f"{path}: cannot read YAML ({e})") from None
    return _build(schema, merged, overrides)


def override_config(cfg: Any, overrides: list[str]) -> Any:
    """A new config of cfg's type: cfg with `a.b=value` overrides, checked as strictly as a load."""
    return _build(type(cfg), OmegaConf.create(to_dict(cfg)), overrides)


def _build(schema: type, merged, overrides: list[str]) -> Any:
    if overrides:
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"override must look like key=value: {bad[0]!r}")
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
    return from_dict(schema, OmegaConf.to_container(merged, resolve=True) or {})


def load_model_config(preset: str = "unix", overrides: list[str] = ()) -> ModelConfig:
    return load_config(ModelConfig, [preset_path("model", preset)], overrides)


def from_dict(schema: type, data: dict, where: str = "") -> Any:
    """Build dataclass `schema` from plain data; unknown keys and wrong types raise ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(schema)
    names = {f.name for f in dataclasses.fields(schema)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown key {where + unknown[0]!r} (allowed: {', '.join(sorted(names))})")
    kwargs = {k: _convert(hints[k], v, f"{where}{k}") for k, v in data.items()}
    try:
        return schema(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where or 'config'}: {e}") from None


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where + ".")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where}={value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)[:1] or (Any,)
        out = [_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return out if origin is list else tuple(out)
    if origin is dict or tp is Any:
        return value
    if tp is str and value is None:
        return ""  # `key=` on the command line: OmegaConf reads an empty value as null
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def to_dict(cfg: Any) -> dict:
    """Plain nested dict of a config dataclass (for JSON next to checkpoints)."""
    return dataclasses.asdict(cfg)
