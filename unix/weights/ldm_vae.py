"""Adapter: latent-diffusion (LDM / Lightning) KL-VAE checkpoints -> diffusers `AutoencoderKL`.

The released UniX VAE (`vae/kl-f16d16.ckpt`) is in the original LDM layout (`encoder.down.{i}.
block.{j}.*`, `decoder.up.{i}.*`, 1x1-conv attention). We do not use diffusers' own converter:
it silently drops the attention layers at the lowest resolution (`encoder.down.4.attn.*`,
`decoder.up.4.attn.*`, 50 tensors for kl-f16), after which decodes differ by up to 2.0.

Instead the table below derives, for every parameter of the model `build_vae(cfg)` builds, the
LDM name it comes from. Conversion is strict: every LDM tensor (other than the training-only
`loss.*`) must be consumed and every parameter filled with the right shape, or a UserError names
the offending tensors.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from unix.config import VAEConfig
from unix.errors import UserError
from unix.models.vae import LatentCodec, build_vae

# ----------------------------------------------------------------------------------------------
# Name table: diffusers module prefix -> LDM module prefix
# ----------------------------------------------------------------------------------------------
# Each rule is (regex on the diffusers name, function of (match, n_levels) -> LDM prefix). The
# decoder is the one non-obvious part: LDM numbers decoder levels from the highest resolution
# (`up.0` is full size, `up.{n-1}` the 16x-downsampled level it runs first), diffusers numbers
# `up_blocks` in execution order, so `up_blocks.k` = `up.{n-1-k}`.
_Rule = tuple[re.Pattern, Callable[[re.Match, int], str]]
_PREFIX_RULES: list[_Rule] = [
    (re.compile(r"(encoder|decoder)\.conv_in\."), lambda m, n: f"{m[1]}.conv_in."),
    (re.compile(r"(encoder|decoder)\.conv_out\."), lambda m, n: f"{m[1]}.conv_out."),
    (re.compile(r"(encoder|decoder)\.conv_norm_out\."), lambda m, n: f"{m[1]}.norm_out."),
    (re.compile(r"(encoder|decoder)\.mid_block\.resnets\.0\."), lambda m, n: f"{m[1]}.mid.block_1."),
    (re.compile(r"(encoder|decoder)\.mid_block\.attentions\.0\."), lambda m, n: f"{m[1]}.mid.attn_1."),
    (re.compile(r"(encoder|decoder)\.mid_block\.resnets\.1\."), lambda m, n: f"{m[1]}.mid.block_2."),
    (re.compile(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\."), lambda m, n: f"encoder.down.{m[1]}.block.{m[2]}."),
    (re.compile(r"encoder\.down_blocks\.(\d+)\.attentions\.(\d+)\."), lambda m, n: f"encoder.down.{m[1]}.attn.{m[2]}."),
    (re.compile(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\."), lambda m, n: f"encoder.down.{m[1]}.downsample.conv."),
    (re.compile(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\."), lambda m, n: f"decoder.up.{n - 1 - int(m[1])}.block.{m[2]}."),
    (re.compile(r"decoder\.up_blocks\.(\d+)\.attentions\.(\d+)\."), lambda m, n: f"decoder.up.{n - 1 - int(m[1])}.attn.{m[2]}."),
    (re.compile(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\."), lambda m, n: f"decoder.up.{n - 1 - int(m[1])}.upsample.conv."),
    (re.compile(r"(post_quant_conv|quant_conv)\."), lambda m, n: f"{m[1]}."),
]

# Inside a resnet or attention block: diffusers sub-module name -> LDM sub-module name
# (norm1/conv1/norm2/conv2 are the same in both).
_LEAF_RENAMES = {
    "conv_shortcut": "nin_shortcut",
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}

# LDM attention projects with 1x1 convs ([C, C, 1, 1]); diffusers uses Linear ([C, C]).
_ATTN_LINEAR = re.compile(r"\.attentions\.\d+\.(to_q|to_k|to_v|to_out\.0)\.weight$")


def ldm_name(diffusers_name: str, n_levels: int) -> str:
    """The LDM state-dict name of one diffusers AutoencoderKL parameter."""
    for pattern, prefix in _PREFIX_RULES:
        m = pattern.match(diffusers_name)
        if m:
            module, _, tensor = diffusers_name[m.end():].rpartition(".")  # e.g. ("to_out.0", "weight")
            module = _LEAF_RENAMES.get(module, module)
            return prefix(m, n_levels) + (f"{module}.{tensor}" if module else tensor)
    raise AssertionError(f"no LDM name rule for diffusers parameter {diffusers_name!r}")  # a bug here


def name_table(cfg: VAEConfig) -> dict[str, str]:
    """{LDM name: diffusers name} for exactly the parameters of `build_vae(cfg)`."""
    with torch.device("meta"):
        target = build_vae(cfg).state_dict()
    n = len(cfg.block_out_channels)
    return {ldm_name(k, n): k for k in target}


# ----------------------------------------------------------------------------------------------
# Conversion
# ----------------------------------------------------------------------------------------------


def unwrap_state_dict(obj: object) -> dict[str, torch.Tensor]:
    """The tensors of a loaded checkpoint: Lightning keeps them under `state_dict`; `loss.*`
    (LPIPS + discriminator, training only) is dropped."""
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise UserError(f"VAE checkpoint: expected a dict of tensors, got {type(obj).__name__}")
    return {k: v for k, v in obj.items() if not k.startswith("loss.")}


def convert_ldm_vae_state_dict(ldm: Mapping[str, torch.Tensor], cfg: VAEConfig) -> dict[str, torch.Tensor]:
    """LDM-format VAE tensors -> the state dict of `build_vae(cfg)`, strictly."""
    ldm = unwrap_state_dict(ldm)
    table = name_table(cfg)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in build_vae(cfg).state_dict().items()}

    missing = sorted(set(table) - set(ldm))
    unexpected = sorted(set(ldm) - set(table))
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing: {_short(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected: {_short(unexpected)}")

    out, wrong = {}, []
    for src, dst in table.items():
        t = ldm.get(src)
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            wrong.append(f"{src} (not a tensor: {type(t).__name__})")
            continue
        if _ATTN_LINEAR.search(dst) and t.dim() == 4 and t.shape[2:] == (1, 1):
            t = t[:, :, 0, 0]  # 1x1 conv [C, C, 1, 1] -> linear [C, C]
        if t.shape != shapes[dst]:
            wrong.append(f"{src} {list(t.shape)} (expected {list(shapes[dst])} for {dst})")
            continue
        out[dst] = t
    if wrong:
        problems.append(f"{len(wrong)} with the wrong shape: {_short(wrong)}")
    if problems:
        raise UserError(
            f"VAE weights do not match the kl-f16 layout of this config "
            f"(block_out_channels={cfg.block_out_channels}, latent_channels={cfg.latent_channels}): "
            + "; ".join(problems)
        )
    return out


def _short(names: list[str], limit: int = 12) -> str:
    more = f", ... (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------


def read_ldm_vae_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a `.ckpt`/`.pth`/`.pt` (weights-only unpickling) or `.safetensors` file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"VAE checkpoint not found: {path}")
    if path.suffix not in (".safetensors", ".ckpt", ".pth", ".pt", ".bin"):
        raise UserError(f"{path}: not a VAE checkpoint (expected .safetensors, .ckpt, .pth, .pt or .bin)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return unwrap_state_dict(load_file(str(path), device="cpu"))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # Never unpickle arbitrary objects from a file on the user's behalf: that runs code.
        raise UserError(
            f"{path} holds Python objects besides tensors, so it cannot be loaded safely "
            f"(weights_only=True: {str(e).splitlines()[0]}). If you trust the file, convert it once: "
            f"python -c \"import torch, safetensors.torch as st; "
            f"sd = torch.load('{path}', map_location='cpu', weights_only=False); sd = sd.get('state_dict', sd); "
            f"st.save_file({{k: v.contiguous() for k, v in sd.items() if not k.startswith('loss.')}}, "
            f"'{path.with_suffix('.safetensors')}')\" and pass the .safetensors file."
        ) from None
    except Exception as e:  # truncated or not a torch file at all
        raise UserError(f"cannot read VAE checkpoint {path}: {e}") from None
    return unwrap_state_dict(obj)


def load_ldm_vae(path: str | Path, cfg: VAEConfig, dtype: torch.dtype = torch.float32) -> LatentCodec:
    """Read an LDM-format VAE checkpoint, convert it strictly, and wrap it in a frozen LatentCodec."""
    weights = convert_ldm_vae_state_dict(read_ldm_vae_file(path), cfg)
    weights = {k: v.to(dtype) for k, v in weights.items()}
    with torch.device("meta"):
        vae = build_vae(cfg)  # structure only; the loaded tensors become the parameters
    vae.load_state_dict(weights, strict=True, assign=True)
    return LatentCodec(vae, cfg)


def save_vae_safetensors(codec: LatentCodec, path: str | Path) -> None:
    """Write the VAE back in the LDM layout as `.safetensors` (loads again with `load_ldm_vae`),
    atomically: a reader never sees half a file."""
    from safetensors.torch import save

    from unix.infer.io import atomic_write

    n = len(codec.cfg.block_out_channels)
    out = {}
    for name, t in codec.vae.state_dict().items():
        if _ATTN_LINEAR.search(name):
            t = t[:, :, None, None]  # linear [C, C] -> 1x1 conv [C, C, 1, 1], as LDM stores it
        out[ldm_name(name, n)] = t.detach().contiguous()
    atomic_write(path, save(out))
