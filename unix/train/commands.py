"""`unix train CONFIG.yaml [key=value ...]` (also `torchrun ... -m unix.train CONFIG [key=value ...]`)."""

from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="run one training stage (single process, or under torchrun)")
    p.add_argument("config", help="stage config YAML (configs/train/*.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. steps=100 data.shards=DIR")
    p.set_defaults(handler=cmd_train)

    p = subparsers.add_parser("train-export", help="write a weights folder from a training checkpoint (to look at a run midway)")
    p.add_argument("checkpoint", help="a checkpoint folder, OUT/checkpoints/step-NNNNNNN")
    p.add_argument("--out", required=True, help="the weights folder to write (must not exist)")
    p.add_argument("--ema", action="store_true", help="the EMA weights instead of the trained ones (runs with optim.ema_decay > 0)")
    p.set_defaults(handler=cmd_train_export)

    p = subparsers.add_parser("train-vae", help="stage 0: train a small KL autoencoder for a new image domain (the phantom set)")
    p.add_argument("--shards", required=True, help="shard folder (train split is used)")
    p.add_argument("--out", required=True, help="output folder: model.safetensors + vae.json (latent scale/shift)")
    p.add_argument("--preset", default="tiny", help="model preset whose `vae` section is trained (default: tiny, the test "
                   "preset; the demo model's recipe uses phantom)")
    p.add_argument("--steps", type=int, default=3000,
                   help="optimizer steps (default: 3000; scripts/train_phantom.sh runs 2000 for the demo model)")
    p.add_argument("--batch-size", type=int, default=16, help="images per step (default: 16; the demo model's recipe uses 8)")
    p.add_argument("--image-size", type=int, default=256, help="side the images are padded and resized to, a multiple of 16 (default: 256)")
    p.add_argument("--crop", type=int, default=0,
                   help="train on random CROP x CROP windows of the images (multiple of 16; 0 = whole images); "
                        "the latent statistics are always taken on whole images")
    p.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate (5%% warm-up, then cosine; default: 1e-3)")
    p.add_argument("--edge-weight", type=float, default=0.0,
                   help="weight of an L1 on neighbouring-pixel differences beside the plain L1, meant for thin lines "
                        "(on the phantom set it sharpened the ribs but read worse: docs/BENCHMARKS.md; default 0)")
    p.add_argument("--init", default="", metavar="DIR",
                   help="start from this train-vae output folder (model.safetensors + vae.json)")
    p.add_argument("--decoder-only", action="store_true",
                   help="fine-tune the decoder of --init alone: the encoder, its latents and their statistics stay")
    p.add_argument("--latent-noise", type=float, default=0.0, metavar="STD",
                   help="with --decoder-only: the decoder reads the normalised latents plus noise of std up to STD "
                        "(uniform per image) and must return the clean image, so a generator's off-manifold samples "
                        "decode cleanly (default 0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation, data order and crops (default: 0)")
    p.set_defaults(handler=cmd_train_vae)

    p = subparsers.add_parser("train-vision", help="stage 0: pre-train the vision tower on image labels (the phantom set's SigLIP)")
    p.add_argument("--shards", required=True, help="shard folder with the 14 CheXpert label columns (train split; val for the score)")
    p.add_argument("--out", required=True, help="output folder: vision.safetensors + vision.json")
    p.add_argument("--preset", default="phantom", help="model preset whose `vision` section is trained (default phantom)")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE", help="model preset override, e.g. vision.depth=6")
    p.add_argument("--steps", type=int, default=3000,
                   help="optimizer steps (default: 3000; scripts/train_phantom.sh runs 8000 for the demo model)")
    p.add_argument("--batch-size", type=int, default=32, help="images per step (default: 32)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate (5%% warm-up, then cosine; default: 1e-3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation and data order (default: 0)")
    p.add_argument("--pool", choices=["mean", "meanmax"], default="mean",
                   help="how the probe pools patch features: mean, or mean and max side by side (default: mean; the "
                        "demo model's recipe uses meanmax, which keeps one-patch findings: docs/training.md)")
    p.set_defaults(handler=cmd_train_vision)


def cmd_train(args) -> int:
    from unix.train.config import load_train_config
    from unix.train.trainer import run

    import os

    cfg = load_train_config(args.config, args.overrides)
    history = run(cfg)
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 speaks
        return 0
    if history:
        print(f"done: {len(history)} steps, last loss {history[-1]['loss']:.4f}")
    else:
        print(f"{cfg.out}: already trained to step {cfg.steps} (raise steps= to go on); {cfg.out}/final exported again")
    return 0


def cmd_train_export(args) -> int:
    from pathlib import Path

    from unix.train.export import export_checkpoint

    folder = export_checkpoint(Path(args.checkpoint), Path(args.out), ema=args.ema)
    print(f"{folder}: weights folder written from {args.checkpoint}")
    return 0


def cmd_train_vae(args) -> int:
    from unix.errors import UserError
    from unix.train.vae import VAETrainSettings, train_vae

    if args.image_size % 16:
        raise UserError(f"--image-size {args.image_size} is not a multiple of 16")
    if args.edge_weight < 0:
        raise UserError(f"--edge-weight {args.edge_weight} must be >= 0")
    if args.crop % 16 or not 0 <= args.crop <= args.image_size:
        raise UserError(f"--crop {args.crop} must be a multiple of 16 between 0 and --image-size ({args.image_size})")
    if args.latent_noise < 0:
        raise UserError(f"--latent-noise {args.latent_noise} must be >= 0")
    stats = train_vae(VAETrainSettings(args.shards, args.out, args.preset, args.steps, args.batch_size, args.image_size, args.lr,
                                       seed=args.seed, crop=args.crop, edge_weight=args.edge_weight, init=args.init,
                                       decoder_only=args.decoder_only, latent_noise=args.latent_noise))
    print(f"vae.scale={stats['scale']:.6f} vae.shift={stats['shift']:.6f} (final L1 {stats['l1']:.4f})")
    return 0


def cmd_train_vision(args) -> int:
    from unix.train.vision import VisionTrainSettings, train_vision

    stats = train_vision(VisionTrainSettings(args.shards, args.out, args.preset, tuple(args.override), args.steps,
                                             args.batch_size, args.lr, args.seed, args.pool))
    f1 = stats["val_micro_f1"]
    f1_text = "no val split" if f1 is None else f"{f1:.3f}"
    print(f"{args.out}: vision tower written (validation micro-F1 of the label probe: {f1_text})")
    return 0
