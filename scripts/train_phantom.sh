#!/usr/bin/env bash
# Train the embedded demo model (weights/phantom-tiny) on CXR-Phantom, every stage, fixed seeds.
# One command, CPU (about 83 minutes on 2 cores; stage times in docs/BENCHMARKS.md): bash scripts/train_phantom.sh [WORK_DIR]
# The result is copied to weights/phantom-tiny only when COPY=1 (the default), after every stage ran.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-runs/phantom}
UNIX=${UNIX:-.venv/bin/unix}
PRESET=${PRESET:-phantom}       # configs/model/phantom.yaml
N_IMAGES=${N_IMAGES:-10000}     # train/val/test 80/10/10 by index
VAE_STEPS=${VAE_STEPS:-1500}
VISION_STEPS=${VISION_STEPS:-8000}
S1_STEPS=${S1_STEPS:-2500}
S2_STEPS=${S2_STEPS:-1000}
COPY=${COPY:-1}
mkdir -p "$WORK"

# data: phantom images at 256 px, seed 0
[ -d "$WORK/data" ] || $UNIX data phantom --out "$WORK/data" --n "$N_IMAGES" --seed 0

# stage 0a: the phantom VAE (16 latent channels), and its latent normalisation
[ -f "$WORK/vae/model.safetensors" ] || $UNIX train-vae --shards "$WORK/data" --out "$WORK/vae" --preset "$PRESET" \
  --steps "$VAE_STEPS" --batch-size 8 --seed 0
SCALE=$(python3 -c "import json;print(json.load(open('$WORK/vae/vae.json'))['scale'])")
SHIFT=$(python3 -c "import json;print(json.load(open('$WORK/vae/vae.json'))['shift'])")

# stage 0b: the vision tower, pre-trained on the training labels (the phantom stand-in for SigLIP)
[ -f "$WORK/vision/vision.safetensors" ] || $UNIX train-vision --shards "$WORK/data" --out "$WORK/vision" \
  --preset "$PRESET" --steps "$VISION_STEPS" --seed 0

# stage 1: understanding (reports); the tokenizer is trained on the training reports
$UNIX train configs/train/phantom_stage1.yaml data.shards="$WORK/data" out="$WORK/stage1" steps="$S1_STEPS" \
  model="$PRESET" vision="$WORK/vision/vision.safetensors" "model_overrides=[vae.scale=$SCALE,vae.shift=$SHIFT]"

# stage 2: generation at 256 px from stage 1 (und copied to gen), understanding frozen
$UNIX train configs/train/phantom_stage2.yaml data.shards="$WORK/data" out="$WORK/stage2" steps="$S2_STEPS" \
  init="$WORK/stage1/final" vae="$WORK/vae/model.safetensors"

if [ "$COPY" = 1 ]; then
  rm -rf weights/phantom-tiny.new && cp -r "$WORK/stage2/final" weights/phantom-tiny.new
  rm -rf weights/phantom-tiny && mv weights/phantom-tiny.new weights/phantom-tiny
  echo "weights/phantom-tiny updated from $WORK/stage2/final"
fi
