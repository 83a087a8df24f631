"""Samples as lists of segments, packed into one token sequence with positions and attention metadata.

Token kinds: text tokens (including BOI/EOI around every image) use the und weights and the
embedding table; ViT feature tokens use und weights; latent tokens use the gen weights.
RoPE positions (DESIGN.md section 3): restart at 0 per sample; text counts up; all tokens of an
image group (BOI, features, EOI) share one position, then the counter advances by 1, except after
a noisy latent image (always last).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import torch

from unix.config import TokenConfig
from unix.models.attention import PAD_SAMPLE, Mode, TokenMeta


class Kind(IntEnum):
    TEXT = 0
    VIT = 1
    LATENT = 2


@dataclass
class Text:
    """A text segment: ids as given (the caller adds BOS/EOS). `loss` marks answer tokens."""

    ids: list[int]
    loss: bool = False


@dataclass
class VitImage:
    """A ViT image group: BOI, num_patches feature tokens, EOI. `pixels` (3, S, S) normalised."""

    pixels: torch.Tensor


@dataclass
class LatentImage:
    """A VAE latent image group: BOI, h*w latent tokens, EOI. `tokens` (h*w, C) row-major."""

    tokens: torch.Tensor
    h: int
    w: int
    t: float = 0.0  # flow time of these latents (0 = clean)
    noisy: bool = True  # noisy target (mode NOISE) or clean condition (mode FULL)


Segment = Text | VitImage | LatentImage


@dataclass
class PackedBatch:
    """B rows of tokens (B=1 for a packed training sequence). Every per-token tensor is (B, L)."""

    input_ids: torch.Tensor  # text ids; 0 at ViT / latent / pad positions
    position_ids: torch.Tensor  # RoPE positions
    kind: torch.Tensor  # Kind per token
    meta: TokenMeta  # attention metadata
    vit_pixels: torch.Tensor | None = None  # (n_vit_images, 3, S, S), in token order
    latents: torch.Tensor | None = None  # (n_latent_tokens, C), in token order
    timesteps: torch.Tensor | None = None  # (n_latent_tokens,)
    latent_pos: torch.Tensor | None = None  # (n_latent_tokens,) index into the sin-cos table
    text_loss: torch.Tensor | None = None  # (B, L) bool: tokens whose NEXT token is a text target

    @property
    def is_gen(self) -> torch.Tensor:
        return self.kind == Kind.LATENT

    def to(self, device) -> "PackedBatch":
        move = lambda x: x.to(device) if isinstance(x, torch.Tensor) else x  # noqa: E731
        return PackedBatch(
            move(self.input_ids), move(self.position_ids), move(self.kind), self.meta.to(device),
            move(self.vit_pixels), move(self.latents), move(self.timesteps), move(self.latent_pos),
            move(self.text_loss),
        )


def pack(samples: list[list[Segment]], tokens: TokenConfig, num_vit_tokens: int, grid: int, rows: bool = False) -> PackedBatch:
    """Pack samples into one sequence (rows=False, B=1) or one row per sample, right-padded (rows=True)."""
    from unix.models.embeddings import latent_position_ids

    per_row: list[dict[str, list]] = []
    pixels, latents, times, lat_pos = [], [], [], []
    row = None
    for s_idx, sample in enumerate(samples):
        if row is None or rows:
            row = {k: [] for k in ("ids", "pos", "kind", "sample", "segment", "mode", "loss")}
            per_row.append(row)
        r = 0  # RoPE counter, restarts per sample
        for seg_idx, seg in enumerate(sample):
            if isinstance(seg, Text):
                n = len(seg.ids)
                ids, kinds, pos, mode = list(seg.ids), [Kind.TEXT] * n, list(range(r, r + n)), Mode.CAUSAL
                loss = [seg.loss] * n
                r += n
            else:
                if isinstance(seg, VitImage):
                    n_inner, kind, mode = num_vit_tokens, Kind.VIT, Mode.FULL
                    pixels.append(seg.pixels)
                else:
                    n_inner, kind = seg.h * seg.w, Kind.LATENT
                    mode = Mode.NOISE if seg.noisy else Mode.FULL
                    if seg.tokens.shape[0] != n_inner:
                        raise ValueError(f"latent image has {seg.tokens.shape[0]} tokens, expected {seg.h}x{seg.w}")
                    latents.append(seg.tokens)
                    times.append(torch.full((n_inner,), float(seg.t)))
                    lat_pos.append(latent_position_ids(seg.h, seg.w, grid))
                ids = [tokens.boi] + [0] * n_inner + [tokens.eoi]
                kinds = [Kind.TEXT] + [kind] * n_inner + [Kind.TEXT]
                pos = [r] * (n_inner + 2)
                loss = [False] * (n_inner + 2)
                if not (isinstance(seg, LatentImage) and seg.noisy):
                    r += 1
            row["ids"] += ids
            row["pos"] += pos
            row["kind"] += [int(k) for k in kinds]
            row["sample"] += [s_idx] * len(ids)
            row["segment"] += [seg_idx] * len(ids)
            row["mode"] += [int(mode)] * len(ids)
            row["loss"] += _shift_loss(loss)
    L = max(len(rw["ids"]) for rw in per_row)

    def col(key: str, pad) -> torch.Tensor:
        return torch.tensor([rw[key] + [pad] * (L - len(rw[key])) for rw in per_row], dtype=torch.long)

    order = torch.arange(L).expand(len(per_row), L).contiguous()
    meta = TokenMeta(col("sample", PAD_SAMPLE), col("segment", 0), col("mode", int(Mode.FULL)), order)
    return PackedBatch(
        input_ids=col("ids", 0),
        position_ids=col("pos", 0),
        kind=col("kind", int(Kind.TEXT)),
        meta=meta,
        vit_pixels=torch.stack(pixels) if pixels else None,
        latents=torch.cat(latents) if latents else None,
        timesteps=torch.cat(times) if times else None,
        latent_pos=torch.cat(lat_pos) if lat_pos else None,
        text_loss=col("loss", False).bool(),
    )


def _shift_loss(loss: list[bool]) -> list[bool]:
    """Answer token i is predicted at position i-1 (within the segment)."""
    return loss[1:] + [False]
