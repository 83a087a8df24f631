#!/usr/bin/env bash
# Train the embedded demo model (weights/phantom-tiny) on CXR-Phantom, every stage, fixed seeds.
# One command, CPU: bash scripts/train_phantom.sh [WORK_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-runs/phantom}
UNIX=${UNIX:-.venv/bin/unix}
N_IMAGES=${N_IMAGES:-6000}
VAE_STEPS=${VAE_STEPS:-3000}
S1_STEPS=${S1_STEPS:-2000}
S2_STEPS=${S2_STEPS:-3000}
MODEL_ARGS=${MODEL_ARGS:-vision.image_size=128}  # extra model overrides (the ViT sees 128 px: 64 patches)
mkdir -p "$WORK"

# data: 6000 phantom images at 256 px (train/val/test 80/10/10), seed 0
[ -d "$WORK/data" ] || $UNIX data phantom --out "$WORK/data" --n "$N_IMAGES" --seed 0

# stage 0: the phantom VAE, and its latent normalisation
[ -f "$WORK/vae/model.safetensors" ] || $UNIX train-vae --shards "$WORK/data" --out "$WORK/vae" --steps "$VAE_STEPS" --batch-size 8 --seed 0
SCALE=$(python3 -c "import json;print(json.load(open('$WORK/vae/vae.json'))['scale'])")
SHIFT=$(python3 -c "import json;print(json.load(open('$WORK/vae/vae.json'))['shift'])")

# stage 1: understanding (reports); the tokenizer is trained on the training reports
$UNIX train configs/train/phantom_stage1.yaml data.shards="$WORK/data" out="$WORK/stage1" steps="$S1_STEPS" \
  "model_overrides=[vae.scale=$SCALE,vae.shift=$SHIFT${MODEL_ARGS:+,$MODEL_ARGS}]"

# stage 2: generation at 256 px from stage 1 (und copied to gen), understanding frozen
$UNIX train configs/train/phantom_stage2.yaml data.shards="$WORK/data" out="$WORK/stage2" steps="$S2_STEPS" \
  init="$WORK/stage1/final" vae="$WORK/vae/model.safetensors"

rm -rf weights/phantom-tiny && cp -r "$WORK/stage2/final" weights/phantom-tiny
echo "weights/phantom-tiny updated from $WORK/stage2/final"
