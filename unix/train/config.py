"""Typed configuration of one training stage (`unix train CONFIG.yaml [key=value ...]`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from unix.config import ConfigError, load_config


@dataclass
class DataConfig:
    shards: str = ""  # folder of parquet shards (`unix data phantom`, MIMIC ingest)
    split: str = "train"
    token_budget: int = 4096  # tokens per packed sequence, per rank and step
    max_samples: int = 64  # at most this many samples in one packed sequence
    image_size: int = 256  # VAE resolution of generation stages (multiple of 16)
    caption_dropout: float = 0.1  # generation: drop the prompt (= the unconditional branch)
    instruction: str = ""  # understanding: instruction text; "" = the paper's report instruction
    # generation: keep each row's VAE latent after its first encoding, up to this many GiB per rank
    # (rows are then encoded one at a time, so a latent never depends on its batch); 0 = encode
    # every batch afresh
    latent_cache_gb: float = 2.0
    # rows that cannot be read (an image that does not decode, no report, a shard pyarrow cannot
    # read) are skipped, named in a warning and counted; past this many distinct ones a process
    # stops, naming the last (0 = stop at the first)
    max_bad_rows: int = 100


@dataclass
class OptimConfig:
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.0
    warmup_steps: int = 100
    schedule: Literal["constant", "cosine"] = "constant"  # after warm-up
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of lr
    grad_clip: float = 1.0  # max global gradient norm (0 = off)
    ema_decay: float = 0.0  # EMA of the trained branch (0 = off)
    # understanding stages: the vision tower's lr as a fraction of lr (a pre-trained tower keeps
    # its features); 0 freezes the tower (the connector still trains)
    vision_lr_scale: float = 1.0


@dataclass
class RepaConfig:
    encoder: str = ""  # "" = off; "raddino" (weights/rad-dino), "phantom" (weights/phantom-classifier), "vision" (the model's tower)
    weight: float = 0.5  # loss = flow MSE + weight x (1 - cos)
    layer: int = -1  # decoder layer (0-based) whose output is aligned; -1 = a third of the way down
    weights_dir: str = "weights"


@dataclass
class TrainConfig:
    stage: Literal["und", "gen"]  # und: decoder und + SigLIP + connector; gen: gen branch only
    model: str = "tiny"  # model preset (configs/model/) or YAML path; ignored when `init` is a folder of ours
    model_overrides: list[str] = field(default_factory=list)  # with `init`: only vae.scale / vae.shift
    init: str = ""  # weights folder to start from (ours or released); "" = random init
    janus: str = ""  # stage 1 on real data: a Janus-Pro-1B folder to initialise from
    tokenizer: str = ""  # folder with tokenizer files; "" = the `init` folder
    vae: str = ""  # VAE file for generation stages; "" = `init`/vae/...
    vision: str = ""  # stage 1 without Janus: a `unix train-vision` tower (vision.safetensors) to start from
    out: str = "runs/stage"  # run folder: checkpoints, metrics.jsonl, final export
    seed: int = 0
    steps: int = 1000
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    repa: RepaConfig = field(default_factory=RepaConfig)  # generation stages only
    # where an untrained gen branch starts: "" = a copy of the init's own und; a weights folder =
    # a copy of its und (same decoder); "random" = no copy, gen keeps the init folder's weights
    gen_init_from: str = ""
    # then scale the gen branch's key-norm gains; < 1 makes gen keys quiet at the start, so gen
    # queries begin by reading the (frozen) prompt keys instead of each other
    gen_init_key_gain: float = 1.0
    # and the gen branch's residual outputs (o_proj, down_proj); 0 = every gen block starts as the identity
    gen_init_out_gain: float = 1.0
    timestep_shift: float = 1.0  # training t = sigmoid(N(0,1)), shifted s t / (1 + (s-1) t)
    # bf16: bf16 compute, fp32 master weights, gradients and reductions (FSDP2's MixedPrecisionPolicy,
    # on one process too); auto: bf16 on CUDA (fp32 for parallel=replicate), fp32 on CPU
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    activation_checkpointing: bool = False
    # under torchrun: fsdp = FSDP2 per layer (large models, GPUs); replicate = a full model per rank
    # and one gradient all-reduce a step (small models on CPU cores: docs/BENCHMARKS.md)
    parallel: Literal["fsdp", "replicate"] = "fsdp"
    attn_backend: Literal["auto", "sdpa", "flex", "flash"] = "auto"
    log_every: int = 10
    save_every: int = 500  # checkpoint every N steps (and at the end)
    keep_last: int = 2  # checkpoints kept
    logger: Literal["none", "wandb"] = "none"
    wandb_project: str = "unix"

    def __post_init__(self) -> None:
        if self.data.image_size % 16:
            raise ConfigError(f"data.image_size={self.data.image_size} is not a multiple of 16")
        if self.data.max_bad_rows < 0:
            raise ConfigError("data.max_bad_rows must be >= 0")
        if self.data.latent_cache_gb < 0:
            raise ConfigError("data.latent_cache_gb must be >= 0")
        if not 0.0 <= self.data.caption_dropout < 1.0:
            raise ConfigError("data.caption_dropout must be in [0, 1)")
        if self.optim.vision_lr_scale < 0:
            raise ConfigError("optim.vision_lr_scale must be >= 0")
        if self.gen_init_key_gain < 0 or self.gen_init_out_gain < 0:
            raise ConfigError("gen_init_key_gain and gen_init_out_gain must be >= 0")
        if self.repa.encoder and self.stage != "gen":
            raise ConfigError("repa: REPA aligns generation tokens; set it on a generation stage only")
        if self.steps < 1 or self.keep_last < 1 or self.save_every < 1:
            raise ConfigError("steps, save_every and keep_last must be at least 1")


def load_train_config(path: str | Path, overrides: list[str] = ()) -> TrainConfig:
    return load_config(TrainConfig, [path], overrides)
