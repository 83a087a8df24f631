#!/usr/bin/env bash
# Train the embedded demo model (weights/phantom-tiny) on CXR-Phantom, every stage, fixed seeds.
# One command, CPU (stage times in docs/BENCHMARKS.md): bash scripts/train_phantom.sh [WORK_DIR]
#
# On a small CPU two independent one-thread processes do about 1.7x the work of one two-thread
# process (the model's matrices are too small to keep two cores busy), so with PARALLEL=1 (the
# default) the work runs in two one-thread lanes: stage 0a (VAE) in the background, and stage 0b
# (vision tower) then stage 1 (reports) in the foreground; stage 2 needs both and runs last, beside
# stage 0c (the VAE decoder's fine-tune), one thread each. Under torchrun on this CPU, FSDP2's many
# small gloo collectives cost what the second process gains (docs/BENCHMARKS.md). PARALLEL=0 runs
# every stage in order, each with every core.
# The result is copied to weights/phantom-tiny only when COPY=1 (the default), after every stage ran.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-runs/phantom}
UNIX=${UNIX:-.venv/bin/unix}
PRESET=${PRESET:-phantom}       # configs/model/phantom.yaml
N_IMAGES=${N_IMAGES:-10000}     # train/val/test 80/10/10 by index
VAE_STEPS=${VAE_STEPS:-2000}   # batches of 8 images
VAE_CROP=${VAE_CROP:-0}          # >0: train on random windows of this size (cheaper, reconstructs worse)
VISION_STEPS=${VISION_STEPS:-8000}
VISION_POOL=${VISION_POOL:-meanmax}  # the label probe reads the mean and the max over patches
S1_STEPS=${S1_STEPS:-4800}  # packed rows of 1,024 tokens (~7 images)
S2_STEPS=${S2_STEPS:-4800}  # packed rows of 2,048 tokens (~20 images at 2x2 latents a token); more steps draw better (docs/BENCHMARKS.md)
DEC_STEPS=${DEC_STEPS:-1200}    # stage 0c: decoder-only fine-tune on noisy latents (batches of 8), beside stage 2
DEC_NOISE=${DEC_NOISE:-2}       # its largest latent noise std (0 with DEC_STEPS=0 skips stage 0c)
GUIDANCE=${GUIDANCE:-4}        # written to the model's sampling.json: unix generate's default for it
PARALLEL=${PARALLEL:-1}
COPY=${COPY:-1}
THREADS=${OMP_NUM_THREADS:-$(nproc)}
mkdir -p "$WORK"

# data: phantom images at 256 px, seed 0
[ -d "$WORK/data" ] || $UNIX data phantom --out "$WORK/data" --n "$N_IMAGES" --seed 0

# stage 0a: the phantom VAE (16 latent channels), and its latent normalisation (vae.json)
train_vae() {
  [ -f "$WORK/vae/model.safetensors" ] || $UNIX train-vae --shards "$WORK/data" --out "$WORK/vae" --preset "$PRESET" \
    --steps "$VAE_STEPS" --batch-size 8 --crop "$VAE_CROP" --seed 0
}
if [ "$PARALLEL" = 1 ]; then
  echo "stage 0a (VAE) runs in the background; its progress: $WORK/vae.log"
  OMP_NUM_THREADS=1 train_vae > "$WORK/vae.log" 2>&1 &
  VAE_PID=$!
  trap 'kill "$VAE_PID" 2>/dev/null || true' EXIT  # a failed stage 0b or 1 does not leave it running
  LANE_THREADS=1
else
  OMP_NUM_THREADS=$THREADS train_vae
  LANE_THREADS=$THREADS
fi

# stage 0b: the vision tower, pre-trained on the training labels (the phantom stand-in for SigLIP)
[ -f "$WORK/vision/vision.safetensors" ] || OMP_NUM_THREADS=$LANE_THREADS $UNIX train-vision --shards "$WORK/data" --out "$WORK/vision" \
  --preset "$PRESET" --steps "$VISION_STEPS" --pool "$VISION_POOL" --seed 0

# stage 1: understanding (reports); the tokenizer is trained on the training reports
OMP_NUM_THREADS=$LANE_THREADS $UNIX train configs/train/phantom_stage1.yaml data.shards="$WORK/data" out="$WORK/stage1" \
  steps="$S1_STEPS" model="$PRESET" vision="$WORK/vision/vision.safetensors"

if [ "$PARALLEL" = 1 ]; then
  wait "$VAE_PID" || { echo "stage 0a (VAE) failed: see $WORK/vae.log" >&2; exit 1; }
  tail -n 1 "$WORK/vae.log"
fi
SCALE=$(python3 -c "import json;print(json.load(open('$WORK/vae/vae.json'))['scale'])")
SHIFT=$(python3 -c "import json;print(json.load(open('$WORK/vae/vae.json'))['shift'])")

# stage 0c: the VAE's decoder fine-tuned alone to return clean images from noisy latents (the encoder,
# and so the latents stage 2 learns, stay as they are): a generator's samples lie a little off the
# real latents, and the plain decoder draws such errors as stripes the classifier reads as findings.
# It needs only stage 0a, so with PARALLEL=1 it runs beside stage 2 (one thread each: stage 2's
# small matrices gain little from a second thread).
train_decoder() {
  [ -f "$WORK/vae_decoder/model.safetensors" ] || $UNIX train-vae --shards "$WORK/data" --out "$WORK/vae_decoder" \
    --preset "$PRESET" --init "$WORK/vae" --decoder-only --latent-noise "$DEC_NOISE" --steps "$DEC_STEPS" --batch-size 8 \
    --lr 2e-4 --seed 0
}
S2_THREADS=$THREADS
if [ "$DEC_STEPS" -gt 0 ] && [ "$PARALLEL" = 1 ]; then
  echo "stage 0c (VAE decoder) runs in the background; its progress: $WORK/vae_decoder.log"
  OMP_NUM_THREADS=1 train_decoder > "$WORK/vae_decoder.log" 2>&1 &
  DEC_PID=$!
  trap 'kill "$DEC_PID" 2>/dev/null || true' EXIT
  S2_THREADS=1
elif [ "$DEC_STEPS" -gt 0 ]; then
  OMP_NUM_THREADS=$THREADS train_decoder
fi

# stage 2: generation at 256 px from stage 1 (gen from its random init, as the config says), understanding frozen; the
# latent normalisation of the new VAE goes into the model config here
OMP_NUM_THREADS=$S2_THREADS $UNIX train configs/train/phantom_stage2.yaml data.shards="$WORK/data" out="$WORK/stage2" steps="$S2_STEPS" \
  init="$WORK/stage1/final" vae="$WORK/vae/model.safetensors" "model_overrides=[vae.scale=$SCALE,vae.shift=$SHIFT]"

# the exported model takes the fine-tuned decoder (same encoder, so the same latents)
if [ "$DEC_STEPS" -gt 0 ]; then
  if [ "$PARALLEL" = 1 ]; then
    wait "$DEC_PID" || { echo "stage 0c (VAE decoder) failed: see $WORK/vae_decoder.log" >&2; exit 1; }
  fi
  cp "$WORK/vae_decoder/model.safetensors" "$WORK/stage2/final/vae/.model.safetensors.new"
  mv "$WORK/stage2/final/vae/.model.safetensors.new" "$WORK/stage2/final/vae/model.safetensors"
fi

# the guidance scale this model follows its prompt best at (docs/BENCHMARKS.md): unix generate's
# default for it (a --guidance flag still wins)
echo "{\"guidance\": $GUIDANCE}" > "$WORK/stage2/final/sampling.json"

if [ "$COPY" = 1 ]; then
  rm -rf weights/phantom-tiny.new && cp -r "$WORK/stage2/final" weights/phantom-tiny.new
  rm -rf weights/phantom-tiny.old
  [ ! -d weights/phantom-tiny ] || mv weights/phantom-tiny weights/phantom-tiny.old
  mv weights/phantom-tiny.new weights/phantom-tiny && rm -rf weights/phantom-tiny.old
  echo "weights/phantom-tiny updated from $WORK/stage2/final"
fi
