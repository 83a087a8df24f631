"""The frozen KL autoencoder of the generation branch (LDM kl-f16 layout) and its latent tokens.

UniX generates in the latent space of the latent-diffusion `kl-f16` VAE: 16x downsampling,
`cfg.latent_channels` channels (16 for the released model). We build it with diffusers'
`AutoencoderKL`, whose Encoder/Decoder compute exactly what the LDM ones do once the weights are
renamed (`unix.weights.ldm_vae`). On top sits `LatentCodec`: pixels in [-1, 1] <-> normalised
latents `z' = scale * (z - shift)`, the space the flow model works in. `patchify`/`unpatchify`
turn a latent grid into the row-major token sequence the decoder stack reads (p x p latents a
token; the release uses p = 1).
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL
from torch import nn

from unix.config import ConfigError, VAEConfig
from unix.errors import UserError

# The released UniX VAE's latent normalisation, hard-coded in the reference wrapper
# (`modeling/autoencoder.py::LatentDiffusionVAEWrapper`: scale_factor, shift_factor). VAEConfig's
# defaults repeat them; a test keeps the two equal.
RELEASED_LATENT_SCALE = 0.238092
RELEASED_LATENT_SHIFT = -0.201906


def build_vae(cfg: VAEConfig) -> AutoencoderKL:
    """An LDM kl-f16-shaped `AutoencoderKL` (random weights), frozen and in eval mode.

    LDM puts vanilla self-attention only at the lowest resolution (`attn_resolutions=[16]` for a
    256 px training size = the last encoder level / first decoder level) plus in both mid blocks,
    so the down path is (n-1) plain blocks + 1 attention block and the up path the mirror image.
    The decoder has `layers_per_block + 1` resnets per level in both LDM and diffusers.
    Build under `with torch.device("meta"):` to get the structure without allocating weights.
    """
    n = len(cfg.block_out_channels)
    if n < 1:
        raise ConfigError("vae.block_out_channels must name at least one level")
    bad = [c for c in cfg.block_out_channels if c % cfg.norm_num_groups]
    if bad:
        raise ConfigError(f"vae.block_out_channels {bad} are not multiples of vae.norm_num_groups={cfg.norm_num_groups}")
    vae = AutoencoderKL(
        in_channels=cfg.in_channels,
        out_channels=cfg.in_channels,
        down_block_types=("DownEncoderBlock2D",) * (n - 1) + ("AttnDownEncoderBlock2D",),
        up_block_types=("AttnUpDecoderBlock2D",) + ("UpDecoderBlock2D",) * (n - 1),
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        act_fn="silu",  # LDM's `nonlinearity` is x*sigmoid(x)
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_num_groups,
        # Recorded in the diffusers config for anyone reading it; LatentCodec applies them itself.
        scaling_factor=cfg.scale,
        shift_factor=cfg.shift,
        mid_block_add_attention=True,
    )
    return freeze(vae)


def freeze(module: nn.Module) -> nn.Module:
    """requires_grad off and eval mode: the VAE is never trained in any UniX stage."""
    module.requires_grad_(False)
    return module.eval()


class LatentCodec(nn.Module):
    """Pixels in [-1, 1] (B, 3, H, W) <-> normalised latents z' (B, C, H/16, W/16).

    `encode` returns the posterior mean unless `sample=True`. The reference wrapper samples by
    default (also for inference-time image conditioning); callers that want that behaviour pass
    `sample=True` with a generator. Latents come back in the VAE's dtype.
    """

    def __init__(self, vae: AutoencoderKL, cfg: VAEConfig):
        super().__init__()
        self.vae = freeze(vae)
        self.cfg = cfg

    def train(self, mode: bool = True) -> LatentCodec:
        # Frozen: a parent model's .train() must not switch the VAE out of eval mode.
        return super().train(False)

    @property
    def downsample(self) -> int:
        return self.cfg.downsample

    # -- latent normalisation ---------------------------------------------------------------
    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Raw posterior latent z -> z' = scale * (z - shift) (roughly unit variance), then the
        optional per-channel standardisation (`vae.channel_scale` / `vae.channel_shift`)."""
        z = self.cfg.scale * (z - self.cfg.shift)
        if self.cfg.channel_scale:
            a, b = self._channel_affine(z)
            z = a * (z - b)
        return z

    def denormalize(self, z_norm: torch.Tensor) -> torch.Tensor:
        """z' -> raw latent z, the exact inverse of `normalize`."""
        if self.cfg.channel_scale:
            a, b = self._channel_affine(z_norm)
            z_norm = z_norm / a + b
        return z_norm / self.cfg.scale + self.cfg.shift

    def _channel_affine(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(channel_scale, channel_shift) shaped (C, 1, 1) for (B, C, h, w) latents."""
        def col(values):
            return torch.tensor(values, dtype=like.dtype, device=like.device)[:, None, None]
        return col(self.cfg.channel_scale), col(self.cfg.channel_shift)

    # -- pixels <-> latents -----------------------------------------------------------------
    @torch.no_grad()
    def encode(
        self, images: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> z' (B, C, H/16, W/16)."""
        self.check_images(images)
        param = next(self.vae.parameters())
        x = images.to(device=param.device, dtype=param.dtype)
        # DiagonalGaussianDistribution clamps logvar to [-30, 20], as LDM does.
        posterior = self.vae.encode(x).latent_dist
        z = posterior.sample(generator=generator) if sample else posterior.mean
        return self.normalize(z)

    def encode_gray(self, gray: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) grey radiographs in [0, 1] -> z' (the VAE reads RGB copies in [-1, 1])."""
        return self.encode(gray.expand(-1, 3, -1, -1) * 2 - 1)

    @torch.no_grad()
    def decode(self, z_norm: torch.Tensor) -> torch.Tensor:
        """z' (B, C, h, w) -> images (B, 3, 16h, 16w), approximately in [-1, 1] (not clamped)."""
        if z_norm.dim() != 4 or z_norm.shape[1] != self.cfg.latent_channels:
            raise UserError(
                f"latents must be (B, {self.cfg.latent_channels}, h, w), got {tuple(z_norm.shape)}"
            )
        param = next(self.vae.parameters())
        z = self.denormalize(z_norm.to(device=param.device, dtype=param.dtype))
        return self.vae.decode(z).sample

    def check_images(self, images: torch.Tensor) -> None:
        """Fail clearly on a wrong layout or a size the 16x downsampling cannot represent."""
        if images.dim() != 4 or images.shape[1] != self.cfg.in_channels:
            raise UserError(f"images must be (B, {self.cfg.in_channels}, H, W), got {tuple(images.shape)}")
        H, W = images.shape[-2:]
        f = self.cfg.downsample
        if H % f or W % f:
            raise UserError(f"image size {H}x{W} is not a multiple of the VAE downsampling factor {f}")


# ----------------------------------------------------------------------------------------------
# Latent grid <-> token sequence
# ----------------------------------------------------------------------------------------------


def patchify(z: torch.Tensor, p: int = 1) -> torch.Tensor:
    """(B, C, h, w) -> (B, (h/p)*(w/p), p*p*C): row-major tokens (index y*(w/p) + x), each token
    its p x p latents with channels last, as the reference `einsum("chpwq->hwpqc")`."""
    if z.dim() != 4:
        raise ValueError(f"patchify expects (B, C, h, w), got {tuple(z.shape)}")
    B, C, h, w = z.shape
    if h % p or w % p:
        raise ValueError(f"patchify: a {h}x{w} latent grid does not split into {p}x{p} patches")
    z = z.reshape(B, C, h // p, p, w // p, p)
    return torch.einsum("bchpwq->bhwpqc", z).reshape(B, (h // p) * (w // p), p * p * C)


def unpatchify(tokens: torch.Tensor, h: int, w: int, p: int = 1) -> torch.Tensor:
    """(B, (h/p)*(w/p), p*p*C) -> (B, C, h, w), the inverse of `patchify`; h, w are latent sides."""
    B, L, D = tokens.shape
    if h % p or w % p or L != (h // p) * (w // p) or D % (p * p):
        raise ValueError(f"unpatchify: {L} tokens of {D} values do not fill a {h}x{w} grid in {p}x{p} patches")
    x = tokens.reshape(B, h // p, w // p, p, p, D // (p * p))
    return torch.einsum("bhwpqc->bchpwq", x).reshape(B, D // (p * p), h, w)
