"""One trainer for every stage: understanding SFT (stage 1) and generation training (stages 2-3).

    unix train configs/train/phantom_stage1.yaml steps=200
    torchrun --nproc_per_node=8 -m unix.train configs/train/stage2_gen_pretrain.yaml

Everything a run needs is checked before any compute starts; every step's randomness (timesteps,
noise, caption dropout) comes from a generator seeded by (seed, step, rank), so a resumed run
reproduces an uninterrupted one.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from unix.config import ModelConfig, load_model_config, override_config, to_dict
from unix.data.dataset import READ_ERRORS, BadRow, Item, Packer, RowStream, decode_gray
from unix.data.shards import shard_paths
from unix.errors import UserError
from unix.flow import interpolate, sample_t, velocity_target
from unix.models.sequence import LatentImage, Text, VitImage, pack
from unix.models.unix import UniX
from unix.models.vae import patchify
from unix.models.vision import normalize_pixels
from unix.tokenizer import REPORT_INSTRUCTION, Tokenizer, train_tokenizer
from unix.train import parallel
from unix.train.checkpoint import TrainingState, checkpoints, clean_unfinished, full_model_state, old_format, resume, save_checkpoint
from unix.train.config import TrainConfig
from unix.train.export import STAGES_FILE, find_vae, training_input_stats, write_weights_folder
from unix.train.logger import MetricsLogger
from unix.train.optim import EMA, build_optimizer, lr_factor
from unix.weights.folder import CONFIG_FILE, VAE_FILES, load_model, read_model_config

log = logging.getLogger(__name__)


class LatentCache:
    """Row key -> VAE latent, filled as rows are first drawn, until `gb` GiB are held. The VAE is
    frozen and encodes the posterior mean, so a cached latent is exactly a fresh encoding."""

    def __init__(self, gb: float):
        self.budget, self.used, self.items = int(gb * 2**30), 0, {}

    def get(self, key) -> torch.Tensor | None:
        return self.items.get(key)

    def add(self, key, latent: torch.Tensor) -> torch.Tensor:
        size = latent.numel() * latent.element_size()
        if self.used + size <= self.budget:
            self.items[key] = latent
            self.used += size
        return latent


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg, self.d = cfg, parallel.setup()
        self.out = Path(cfg.out)
        self._check_inputs()
        torch.manual_seed(cfg.seed)
        self.model = self._build_model()
        self.token_side = self._token_side() if cfg.stage == "gen" else 0
        self.codec = self._vae() if cfg.stage == "gen" else None
        self.latents = LatentCache(cfg.data.latent_cache_gb) if self.codec is not None and cfg.data.latent_cache_gb > 0 else None
        und = cfg.stage == "und"
        # vision_lr_scale 0 freezes the tower; the connector still trains
        self.model.set_trainable(und=und, gen=not und, vision=und, tower=und and cfg.optim.vision_lr_scale > 0)
        self.stream = RowStream(cfg.data.shards, cfg.data.split, cfg.seed, self.d.rank, self.d.world, cfg.data.max_bad_rows)
        self.packer = Packer(self.stream, self._item, cfg.data.token_budget, cfg.data.max_samples)
        self.step = 0
        self.model.to(self.d.device)
        self.repa = self._repa() if cfg.repa.encoder else None  # before sharding: "vision" copies the tower
        self.model.decoder.checkpointing = cfg.activation_checkpointing
        parallel.wrap_model(self.model, self.d, cfg.parallel, self.bf16)
        self.trained = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.trained, cfg.optim)
        self.ema = EMA(self.trained, cfg.optim.ema_decay) if cfg.optim.ema_decay > 0 else None
        resumed = self._resume()
        self.tokenizer = self._tokenizer(resumed)

    # --- set-up ---------------------------------------------------------------------------

    @property
    def bf16(self) -> bool:
        """bf16 compute with fp32 master weights (FSDP2's mixed precision, on one process too);
        `auto` means on CUDA, except for replicas, which compute in fp32."""
        if self.cfg.precision == "auto":
            return self.d.device.type == "cuda" and not (self.d.world > 1 and self.cfg.parallel == "replicate")
        return self.cfg.precision == "bf16"

    def _check_inputs(self) -> None:
        cfg = self.cfg
        if not cfg.data.shards or not Path(cfg.data.shards).is_dir():
            raise UserError(f"data.shards: shard folder {cfg.data.shards!r} not found")
        if not shard_paths(cfg.data.shards, cfg.data.split):
            raise UserError(f"data.shards: {cfg.data.shards} holds no '{cfg.data.split}-*.parquet' shards (data.split)")
        if cfg.logger == "wandb" and importlib.util.find_spec("wandb") is None:
            raise UserError("logger=wandb needs the wandb package (pip install 'unix[wandb]')")
        for key in ("init", "janus", "tokenizer"):
            value = getattr(cfg, key)
            if value and not Path(value).is_dir():
                raise UserError(f"{key}: folder {value!r} not found")
        if cfg.gen_init_from not in ("", "random") and not Path(cfg.gen_init_from).is_dir():
            raise UserError(f"gen_init_from: folder {cfg.gen_init_from!r} not found (or use \"random\")")
        for key in ("vae", "vision"):
            value = getattr(cfg, key)
            if value and not Path(value).is_file():
                raise UserError(f"{key}: file {value!r} not found")
        if cfg.stage == "gen" and not cfg.vae and not (cfg.init and any((Path(cfg.init) / v).is_file() for v in VAE_FILES)):
            raise UserError("vae: a generation stage needs a VAE (set vae=PATH or use an init folder with vae/)")
        if self.bf16 and self.d.world > 1 and cfg.parallel == "replicate":
            raise UserError("precision=bf16: replicas (parallel=replicate) compute in fp32; use parallel=fsdp for bf16")
        if old_format(self.out):
            raise UserError(f"out: {old_format(self.out)[-1]} is a checkpoint of an earlier unix (a weights folder with "
                            "train_state.pt), which this one cannot resume; start from its weights with init=FOLDER and another out=")
        run = self.out / "run.json"
        if run.is_file() and checkpoints(self.out):  # a run that never saved a step has nothing to resume
            prev = json.loads(run.read_text())
            if prev.get("stage") != cfg.stage or prev.get("model") != cfg.model:
                raise UserError(f"out: {self.out} holds a run of stage {prev.get('stage')!r} / model {prev.get('model')!r}, "
                                f"not stage {cfg.stage!r} / model {cfg.model!r}; use another out= (its checkpoints would resume)")

    def _token_side(self) -> int:
        try:
            return self.model.cfg.token_grid(self.cfg.data.image_size)
        except ValueError as e:
            raise UserError(f"data.image_size: {e} (VAE downsampling x gen.latent_patch_size; gen.max_latent_size)") from None

    def _model_config(self) -> ModelConfig:
        if self.cfg.init:
            cfg = read_model_config(Path(self.cfg.init))
        else:
            cfg = load_model_config(self.cfg.model, self.cfg.model_overrides)
        cfg.attn_backend = self.cfg.attn_backend
        return cfg

    def _build_model(self) -> UniX:
        cfg = self._model_config()
        if self.cfg.init:
            model, _ = load_model(self.cfg.init)
            model.cfg.attn_backend = cfg.attn_backend
            stages = self._init_stages()
            _apply_init_overrides(model, self.cfg.model_overrides, gen_trained="gen" in stages)
            if self.cfg.stage == "gen" and "gen" not in stages:
                self._init_gen(model)
            return model.train()
        model = UniX(cfg)
        if self.cfg.janus:
            from unix.weights.janus import load_janus

            load_janus(model, self.cfg.janus)
        if self.cfg.vision:
            from unix.train.vision import load_vision_tower

            load_vision_tower(model.vision, self.cfg.vision)
        return model.train()

    def _info(self, *args) -> None:
        if self.d.main:
            log.info(*args)

    def _warn(self, *args) -> None:
        if self.d.main:
            log.warning(*args)

    def _init_gen(self, model: UniX) -> None:
        src = self.cfg.gen_init_from
        if src == "random":
            self._info("init has no trained generation branch: gen keeps its untrained init")
        elif src:
            if to_dict(read_model_config(Path(src)).lm) != to_dict(model.cfg.lm):
                raise UserError(f"gen_init_from: {src} has another decoder than init {self.cfg.init}")
            self._info("init has no trained generation branch: copying und of %s -> gen", src)
            model.init_gen_from_und(source=load_model(src)[0])
        else:
            self._info("init has no trained generation branch: copying und -> gen")
            model.init_gen_from_und()
        model.scale_gen_init(self.cfg.gen_init_key_gain, self.cfg.gen_init_out_gain)

    def _repa(self):
        from unix.train.repa import Repa

        return Repa(self.cfg.repa, self.model, self.cfg.optim, self.d.device)

    def _init_stages(self) -> list[str]:
        path = Path(self.cfg.init) / STAGES_FILE
        return json.loads(path.read_text()).get("stages", []) if path.is_file() else []

    def _tokenizer(self, resumed: Path | None) -> Tokenizer:
        # a resumed run keeps the tokenizer its checkpoint was trained with
        stored = str(resumed) if resumed is not None and (resumed / "tokenizer.json").is_file() else ""
        folder = self.cfg.tokenizer or self.cfg.init or self.cfg.janus or stored
        tokens = self.model.cfg.tokens
        if folder:
            return Tokenizer.from_folder(folder, tokens)
        # No tokenizer anywhere: train a byte-level BPE on this data's reports (our tiny models).
        reports = self._reports()
        if self.d.main:
            log.info("training a %d-token BPE tokenizer on %d reports", self.model.cfg.lm.vocab_size, len(reports))
        return train_tokenizer(reports, self.model.cfg.lm.vocab_size, tokens)

    def _reports(self) -> list[str]:
        """Every report text of the training split; a shard that cannot be read is named and left out
        (its rows are skipped in training too)."""
        import pyarrow.parquet as pq

        reports = []
        for path in shard_paths(self.cfg.data.shards, self.cfg.data.split):
            try:
                column = pq.read_table(path, columns=["report"]).column("report").to_pylist()
            except READ_ERRORS as e:
                self._warn("data: %s cannot be read (%s): its reports are left out of the tokenizer", path, e)
                continue
            reports += [r for r in column if isinstance(r, str)]
        return reports

    def _vae(self):
        from unix.weights.ldm_vae import load_ldm_vae

        return load_ldm_vae(find_vae(self.cfg.vae, self.cfg.init), self.model.cfg.vae).to(self.d.device)

    def _item(self, row: dict) -> Item:
        cfg, mcfg = self.cfg, self.model.cfg
        if not isinstance(row.get("report"), str):
            raise BadRow("no report text")
        report = self.tokenizer.segment(row["report"])
        if cfg.stage == "und":
            prompt = self.tokenizer.segment(cfg.data.instruction or REPORT_INSTRUCTION)
            image = decode_gray(row.get("image"), mcfg.vision.image_size, fill=1.0)  # white letterbox, as inference
            return Item(prompt, report, image, mcfg.vision.num_patches + 2 + len(prompt) + len(report))
        n_tokens = len(report) + self.token_side ** 2 + 2
        latent = self.latents.get(self.stream.key) if self.latents is not None else None
        if latent is not None and not cfg.repa.encoder:  # REPA's encoder reads the pixels
            return Item(report, [], None, n_tokens, latent)
        image = decode_gray(row.get("image"), cfg.data.image_size, fill=0.0)
        if latent is None and self.latents is not None:
            latent = self.latents.add(self.stream.key, self._encode(image[None])[0])
        return Item(report, [], image, n_tokens, latent)

    def _encode(self, gray: torch.Tensor) -> torch.Tensor:
        """(n, 1, S, S) in [0, 1] -> normalised VAE latents (n, C, h, w), float32 on CPU."""
        return self.codec.encode_gray(gray.to(self.d.device)).float().cpu()

    # --- resume ---------------------------------------------------------------------------

    def _state(self) -> TrainingState:
        return TrainingState(self.model, self.optimizer, self.ema)

    def _resume(self) -> Path | None:
        """Load the newest checkpoint of `out` that loads; returns its folder (None: a fresh run)."""
        if self.d.main:
            clean_unfinished(self.out)
        parallel.barrier()
        path, state = resume(self.out, self._state(), self.d)
        if path is None:
            return None
        self._info("resumed from %s", path)
        self.step = int(state["step"])
        ranks = state["ranks"]
        self.packer.load_state_dict([r["data"] for r in ranks])
        if self.repa is not None:
            if not state.get("repa"):
                raise UserError(f"out: the checkpoint in {self.out} was written without REPA; resume with repa.encoder=''")
            self.repa.load_state_dict(state["repa"])
        torch.set_rng_state(ranks[self.d.rank if len(ranks) == self.d.world else 0]["rng"])
        return path

    # --- the step -------------------------------------------------------------------------

    def _generator(self, step: int) -> torch.Generator:
        return torch.Generator().manual_seed((self.cfg.seed * 1_000_003 + step) * 1009 + self.d.rank)

    def _samples(self, items: list[Item], g: torch.Generator):
        mcfg, dev = self.model.cfg, self.d.device
        if self.cfg.stage == "und":
            pixels = normalize_pixels(torch.stack([it.image for it in items]), mcfg.vision)
            return [[VitImage(px), Text(it.prompt), Text(it.answer, loss=True)] for px, it in zip(pixels, items)], None, None
        # With the cache every item has its latent, and pixels only when REPA reads them.
        gray = torch.stack([it.image for it in items]).to(dev) if self.latents is None or self.cfg.repa.encoder else None
        z = torch.stack([it.latent for it in items]) if self.latents is not None else self._encode(gray)
        p = mcfg.gen.latent_patch_size
        h, w = z.shape[-2] // p, z.shape[-1] // p  # the token grid
        repa_targets = self.repa.targets(gray, h, w) if self.repa is not None else None
        x0 = patchify(z, p).cpu()  # (n, h*w, p*p*C)
        n = len(items)
        t = sample_t(n, self.cfg.timestep_shift, generator=g)
        eps = torch.randn(x0.shape, generator=g)
        x_t, target = interpolate(x0, eps, t), velocity_target(x0, eps)
        drop = torch.rand(n, generator=g) < self.cfg.data.caption_dropout
        samples = [([] if drop[i] else [Text(it.prompt)]) + [LatentImage(x_t[i], h, w, t=float(t[i]))] for i, it in enumerate(items)]
        return samples, target.reshape(-1, target.shape[-1]), repa_targets

    def train_step(self) -> dict:
        cfg, mcfg, dev = self.cfg, self.model.cfg, self.d.device
        skipped = self.stream.skipped
        items = self.packer.next_batch()
        samples, target, repa_targets = self._samples(items, self._generator(self.step))
        batch = pack(samples, mcfg.tokens, mcfg.vision.num_patches, mcfg.gen.max_latent_size).to(dev)
        # no autocast: in bf16 FSDP2 casts the weights (and the inputs) for the forward
        repa_sum = None
        if cfg.stage == "und":
            out = self.model(batch, logits_at=batch.text_loss)
            targets = batch.input_ids[:, 1:][batch.text_loss[:, :-1]]
            loss_sum = F.cross_entropy(out.logits.float(), targets, reduction="sum")
        else:
            out = self.model(batch, hidden_at=self.repa.layer if self.repa else None)
            targets = target.to(dev)
            loss_sum = (out.velocity.float() - targets).pow(2).mean(dim=-1).sum()
            repa_sum = self.repa.loss_sum(out.tapped[batch.is_gen], repa_targets) if self.repa else None
        n_global = parallel.all_sum(targets.shape[0], self.d)
        total = loss_sum if repa_sum is None else loss_sum + self.repa.weight * repa_sum
        # Gradients are averaged over ranks, so scale by world: the result is sum / global count.
        (total * self.d.world / n_global).backward()
        if self.d.world > 1 and cfg.parallel == "replicate":
            parallel.average_gradients([p for _, p in self.trained], self.d)
        grad_norm = torch.nn.utils.clip_grad_norm_([p for _, p in self.trained], cfg.optim.grad_clip or float("inf"))
        lr = cfg.optim.lr * lr_factor(self.step, cfg.steps, cfg.optim)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.trained, self.step)  # the step count is restored on resume
        if self.repa is not None:
            self.repa.step(lr, self.d.world)
        self.step += 1
        metrics = {"step": self.step, "loss": parallel.all_sum(loss_sum.item(), self.d) / n_global,
                   "grad_norm": float(grad_norm), "lr": lr, "tokens": parallel.all_sum(batch.input_ids.numel(), self.d),
                   "samples": parallel.all_sum(len(items), self.d),
                   "skipped_rows": parallel.all_sum(self.stream.skipped - skipped, self.d)}  # unreadable rows passed over
        if repa_sum is not None:
            metrics["repa"] = parallel.all_sum(repa_sum.item(), self.d) / n_global
        return metrics

    # --- loop and outputs -----------------------------------------------------------------

    def fit(self) -> list[dict]:
        cfg = self.cfg
        if self.d.main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "run.json").write_text(json.dumps({"stage": cfg.stage, "model": cfg.model, "config": to_dict(cfg)}, indent=1))
        logger = MetricsLogger(self.out, cfg, total=cfg.steps, start=self.step, enabled=self.d.main)
        history = []
        try:
            while self.step < cfg.steps:
                t0 = time.perf_counter()
                metrics = self.train_step()
                metrics["tokens_per_s"] = metrics["tokens"] / (time.perf_counter() - t0)
                history.append(metrics)
                logger.log(metrics, every=cfg.log_every)
                if self.step % cfg.save_every == 0 or self.step == cfg.steps:
                    self.save()
        finally:
            logger.close()
        self.export()
        return history

    def save(self) -> None:
        rank_state = {"data": self.packer.state_dict(), "rng": torch.get_rng_state()}
        shared = {"repa": self.repa.state_dict() if self.repa else {}}
        save_checkpoint(self.out, self.step, self._state(), rank_state, shared, self.cfg.keep_last, self.d, self._checkpoint_files)

    def _stages(self) -> list[str]:
        return self._init_stages() + [self.cfg.stage]

    def _checkpoint_files(self, folder: Path) -> None:
        """Beside the shards, what `unix train-export` needs: model config, stages, tokenizer."""
        (folder / CONFIG_FILE).write_text(json.dumps({"unix_model": to_dict(self.model.cfg)}, indent=2))
        (folder / STAGES_FILE).write_text(json.dumps({"stages": self._stages()}))
        self.tokenizer.save(folder)

    def export(self) -> Path:
        """OUT/final: a weights folder `unix report` / `unix generate` load (EMA weights if kept),
        with the tokenizer and VAE this run holds in memory."""
        state = full_model_state(self.model)  # a collective: rank 0 gets the full tensors
        if self.ema is not None:
            state = {**state, **self.ema.full(self.d.main)}
        folder = self.out / "final"
        if self.d.main:
            vae = self.codec if self.codec is not None else find_vae(self.cfg.vae, self.cfg.init)
            stats = training_input_stats(self.cfg.data.shards, self.cfg.data.split)
            write_weights_folder(folder, self.model, state, self._stages(), self.tokenizer.save, vae, stats)
        return folder


# What a stage may change on top of its `init` folder: the latent normalisation belongs to the VAE
# this stage trains with (a new VAE brings new statistics); the latent patch size and the size of
# the position table to a generation branch that has not been trained yet (its latent heads and the
# fixed table are rebuilt), and so may the latent tokens' RoPE layout (no weights of its own).
INIT_OVERRIDABLE = ("vae.scale", "vae.shift", "vae.channel_scale", "vae.channel_shift", "gen.latent_patch_size", "gen.max_latent_size", "gen.latent_rope")


def _apply_init_overrides(model: UniX, overrides: list[str], gen_trained: bool) -> None:
    keys = [item.partition("=")[0].strip() for item in overrides]
    refused = [k for k in keys if k not in INIT_OVERRIDABLE]
    if refused:
        raise UserError(f"model_overrides: {refused[0]!r} cannot change a model loaded from init "
                        f"(only {', '.join(INIT_OVERRIDABLE)} can)")
    if not overrides:
        return
    new = override_config(model.cfg, overrides)
    model.cfg.vae = new.vae  # the modules keep their config objects
    gen = model.cfg.gen
    gen_keys = [k.partition(".")[2] for k in INIT_OVERRIDABLE if k.startswith("gen.")]
    changed = [k for k in gen_keys if getattr(new.gen, k) != getattr(gen, k)]
    if changed and gen_trained:
        raise UserError(f"model_overrides: gen.{changed[0]} cannot change an init whose generation branch is trained")
    if "latent_patch_size" in changed:
        gen.latent_patch_size = new.gen.latent_patch_size
        model.reset_latent_heads()
    if "max_latent_size" in changed:
        gen.max_latent_size = new.gen.max_latent_size
        model.reset_buffers()
    gen.latent_rope = new.gen.latent_rope


def run(cfg: TrainConfig) -> list[dict]:
    try:
        history = Trainer(cfg).fit()
        parallel.barrier()  # no rank tears the group down while rank 0 still writes OUT/final
        return history
    finally:
        parallel.teardown()
