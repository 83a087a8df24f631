"""The composed UniX model: embeddings, the two-branch decoder, and the heads. Predictions only:
losses live in `unix/train`, samplers in `unix/flow.py` and `unix/infer`."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from unix.config import ModelConfig
from unix.models.attention import Mode, TokenMeta, build_plan, resolve_backend
from unix.models.embeddings import TimestepEmbedder, sincos_2d_table
from unix.models.mot import Layout, MoTDecoder, Route
from unix.models.sequence import Kind, PackedBatch
from unix.models.vision import Connector, SiglipVisionTower


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # (n, V) at the positions asked for, in sequence order
    velocity: torch.Tensor | None  # (n_latent_tokens, C) at latent tokens, in sequence order
    hidden: torch.Tensor  # (B, L, D) final-normed hidden states
    tapped: torch.Tensor | None = None  # hidden states after layer `hidden_at`, if asked


class UniX(nn.Module):
    """und: embed_tokens, decoder und weights, norm_und, lm_head, vision tower, connector.
    gen: decoder gen weights, norm_gen, time_embedder, vae2llm, llm2vae."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.lm.hidden_size
        self.embed_tokens = nn.Embedding(cfg.lm.vocab_size, D)
        self.decoder = MoTDecoder(cfg.lm)
        self.lm_head = nn.Linear(D, cfg.lm.vocab_size, bias=False)
        self.vision = SiglipVisionTower(cfg.vision)
        self.connector = Connector(cfg.vision.width, D, cfg.vision.connector_act)
        self.time_embedder = TimestepEmbedder(D, cfg.gen.timestep_freq_dim)
        self.reset_latent_heads()
        grid = cfg.gen.max_latent_size
        # Fixed table, recomputed from the config (not persistent): the loader checks a stored copy against it.
        self.register_buffer("latent_pos_table", sincos_2d_table(grid, D), persistent=False)

    def reset_latent_heads(self) -> None:
        """Fresh vae2llm / llm2vae for the config's latent tokens (C x p x p values each)."""
        D, C = self.cfg.lm.hidden_size, self.cfg.latent_token_dim
        device = self.embed_tokens.weight.device
        self.vae2llm = nn.Linear(C, D, device=device)
        self.llm2vae = nn.Linear(D, C, device=device)
        # Zero output head (as the release initialises it): training starts predicting v = 0.
        nn.init.zeros_(self.llm2vae.weight)
        nn.init.zeros_(self.llm2vae.bias)

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """Recompute the non-persistent tables (after building on the meta device + `to_empty`)."""
        rope = self.decoder.rope
        rope.inv_freq.copy_(rope.frequencies())
        table = sincos_2d_table(self.cfg.gen.max_latent_size, self.cfg.lm.hidden_size)
        self.latent_pos_table = table.to(self.latent_pos_table.device)  # the config's size may have changed

    # --- parameter groups -----------------------------------------------------------------

    def und_parameters(self, include_vision: bool = True):
        for name, p in self.named_parameters():
            if self.branch_of(name) == "und" and (include_vision or not name.startswith(("vision.", "connector."))):
                yield p

    def gen_parameters(self):
        return (p for name, p in self.named_parameters() if self.branch_of(name) == "gen")

    @staticmethod
    def branch_of(name: str) -> str:
        gen_prefixes = ("decoder.norm_gen.", "time_embedder.", "vae2llm.", "llm2vae.")
        if ".gen." in name or name.startswith(gen_prefixes):
            return "gen"
        return "und"

    def set_trainable(self, und: bool, gen: bool, vision: bool | None = None, tower: bool | None = None) -> None:
        """Freeze or unfreeze the branches: vision (tower + connector) defaults to following und,
        the tower alone to following vision."""
        vision = und if vision is None else vision
        tower = vision if tower is None else tower
        for name, p in self.named_parameters():
            if name.startswith("vision."):
                p.requires_grad_(tower)
            elif name.startswith("connector."):
                p.requires_grad_(vision)
            else:
                p.requires_grad_(gen if self.branch_of(name) == "gen" else und)

    def init_gen_from_und(self, source: "UniX | None" = None) -> None:
        """Copy every und per-token weight into its gen twin (start of generation training);
        `source`: take the und weights of another model of the same decoder instead of this one's."""
        src = self if source is None else source
        with torch.no_grad():
            for layer, src_layer in zip(self.decoder.layers, src.decoder.layers, strict=True):
                layer.gen.load_state_dict(src_layer.und.state_dict())
            self.decoder.norm_gen.load_state_dict(src.decoder.norm_und.state_dict())

    def scale_gen_init(self, key_gain: float = 1.0, out_gain: float = 1.0) -> None:
        """Scale the fresh gen branch: its key-norm gains by `key_gain` (< 1: gen keys start quiet, so
        gen queries read the prompt) and its residual outputs (attention o_proj, MLP down_proj) by
        `out_gain` (0: every gen block starts as the identity, the latents passing straight through)."""
        with torch.no_grad():
            for layer in self.decoder.layers:
                # without QK-norm, the key projection itself is scaled
                keys = layer.gen.k_norm if self.cfg.lm.qk_norm else layer.gen.k_proj
                scaled = [(p, key_gain) for p in keys.parameters()]
                scaled += [(layer.gen.o_proj.weight, out_gain), (layer.gen.mlp.down_proj.weight, out_gain)]
                for p, gain in scaled:
                    if gain != 1.0:
                        p.mul_(gain)

    # --- inputs -----------------------------------------------------------------------------

    def embed(self, batch: PackedBatch) -> torch.Tensor:
        """Token embeddings (B, L, D): text from the table, ViT features through the connector,
        latents as vae2llm(x_t) + time_embed(t) + sincos[pos]."""
        h = self.embed_tokens(batch.input_ids)
        kind = batch.kind
        if batch.vit_pixels is not None:
            feats = self.connector(self.vision(batch.vit_pixels.to(h.dtype)))  # (n_img, P, D)
            h = h.masked_scatter((kind == Kind.VIT)[..., None], feats.to(h.dtype).reshape(-1, h.shape[-1]))
        if batch.latents is not None:
            lat = self.latent_embed(batch.latents, batch.timesteps, batch.latent_pos)
            h = h.masked_scatter((kind == Kind.LATENT)[..., None], lat.to(h.dtype))
        return h

    def latent_embed(self, x_t: torch.Tensor, t: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        dtype = self.vae2llm.weight.dtype
        return self.vae2llm(x_t.to(dtype)) + self.time_embedder(t) + self.latent_pos_table[pos].to(dtype)

    def rope_positions(self, batch: PackedBatch) -> torch.Tensor:
        """(B, L) sequence positions, or with `gen.latent_rope: 2d` (B, L, 3): (r, r + y, r + x) at a
        latent token at grid cell (y, x) of an image at position r, (r, r, r) elsewhere."""
        pos = batch.position_ids
        if self.cfg.gen.latent_rope != "2d" or batch.latent_pos is None:
            return pos
        grid = self.cfg.gen.max_latent_size
        yx = torch.stack([batch.latent_pos // grid, batch.latent_pos % grid], dim=-1)  # token order = is_gen order
        pos = pos[..., None].repeat(1, 1, 3)
        pos[..., 1:][batch.is_gen] += yx
        return pos

    # --- forward ----------------------------------------------------------------------------

    def compute_dtype(self) -> torch.dtype:
        """The dtype q/k/v reach attention in: autocast's where it is on, else the weights'."""
        device = self.embed_tokens.weight.device.type
        if torch.is_autocast_enabled(device):
            return torch.get_autocast_dtype(device)
        return self.embed_tokens.weight.dtype

    def layout(self, batch: PackedBatch, keys_meta: TokenMeta | None = None, backend: str | None = None,
               const: torch.Tensor | None = None) -> Layout:
        """Route, rotary tables and attention plan of a batch whose tokens attend to keys with
        metadata `keys_meta` (default: the batch's own tokens). A function of where the tokens are
        only: inference builds it once per layout."""
        device = batch.input_ids.device
        backend = resolve_backend(backend or self.cfg.attn_backend, device, self.compute_dtype())
        keys_meta = batch.meta if keys_meta is None else keys_meta
        cos, sin = self.decoder.rope(self.rope_positions(batch), self.embed_tokens.weight.dtype)
        return Layout(Route.from_mask(batch.is_gen, const), cos, sin, build_plan(backend, batch.meta, keys_meta))

    def forward(
        self,
        batch: PackedBatch,
        logits_at: torch.Tensor | None = None,
        backend: str | None = None,
        caches=None,
        past_meta: TokenMeta | None = None,
        hidden_at: int | None = None,
    ) -> ModelOutput:
        """One pass over a packed batch. `logits_at` (B, L) bool selects where text logits are
        computed (none by default: the vocabulary projection is the costliest head). With `caches`
        (one per layer) and `past_meta`, the batch's tokens attend to the cached tokens too."""
        h = self.embed(batch)
        const = self._und_constants(batch) if self.training and torch.is_grad_enabled() and caches is None else None
        layout = self.layout(batch, None if past_meta is None else past_meta.cat(batch.meta), backend, const)
        hidden, tapped = self.decoder(h, layout, caches, hidden_at)
        logits = self.lm_head(hidden[logits_at]) if logits_at is not None else None
        velocity = self.llm2vae(hidden[batch.is_gen]) if batch.latents is not None else None
        return ModelOutput(logits, velocity, hidden, tapped)

    def _und_constants(self, batch: PackedBatch) -> torch.Tensor | None:
        """(B, L) bool: und tokens that no gradient can reach, when nothing on the und side trains.

        A token's hidden states depend on the tokens it sees (`attention.visible`): every earlier
        segment of its sample except noisy latents, and its own segment. So an und token outside a
        noisy segment, before its sample's first clean latent segment, sees no gen token, directly
        or through another; with und, vision and connector frozen its forward is a constant."""
        if batch.latents is None or any(p.requires_grad for p in self.und_parameters()):
            return None
        meta, is_gen = batch.meta, batch.is_gen
        noisy = meta.mode == int(Mode.NOISE)
        clean_gen = is_gen & ~noisy
        if not bool(clean_gen.any()):
            return ~is_gen & ~noisy
        # per row and sample: the first segment holding a clean latent (samples are ids >= 0; pads -1)
        ids = meta.sample + 1
        big = int(meta.segment.max()) + 1
        first = torch.full((ids.shape[0], int(ids.max()) + 1), big, dtype=meta.segment.dtype, device=ids.device)
        seg = torch.where(clean_gen, meta.segment, torch.full_like(meta.segment, big))
        first = first.scatter_reduce(1, ids, seg, reduce="amin")
        return ~is_gen & ~noisy & (meta.segment < first.gather(1, ids))


def random_model(cfg: ModelConfig, device="cpu", dtype: torch.dtype = torch.float32, std: float = 0.02) -> UniX:
    """A model with N(0, std) weights built directly on `device` (no full CPU init first): for
    benchmarks, where speed does not depend on the weights."""
    with torch.device("meta"):
        model = UniX(cfg)
    model = model.to_empty(device=device)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std)
    model.reset_buffers()
    return model.to(dtype).eval()
