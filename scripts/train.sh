#!/usr/bin/env bash
# Launch examples for `unix train` (one stage per call). Edit the config's data/init paths first.
#
# single process (CPU or one GPU):
#   unix train configs/train/stage1_und.yaml
#
# one node, 8 GPUs (FSDP2 over the 8 ranks):
#   torchrun --standalone --nproc_per_node=8 -m unix.train configs/train/stage2_gen_pretrain.yaml
#
# several nodes (run on every node; MASTER = address of node 0):
#   torchrun --nnodes=$NNODES --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=$MASTER:29500 \
#            --rdzv_id=unix-stage3 -m unix.train configs/train/stage3_gen_finetune.yaml
#
# CPU, 2 processes (gloo), as the tests do:
#   torchrun --standalone --nproc_per_node=2 -m unix.train configs/train/phantom_stage1.yaml steps=10
set -euo pipefail
CONFIG=${1:?usage: scripts/train.sh CONFIG.yaml [key=value ...]}; shift
# the project's environment when it is there (bash install.sh), else whatever python is on PATH
BIN=$(cd "$(dirname "$0")/.." && pwd)/.venv/bin
PY=python3; [ -x "$BIN/python" ] && PY="$BIN/python"
NPROC=${NPROC:-$("$PY" -c "import torch;print(max(1, torch.cuda.device_count()))")}
exec "$PY" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" -m unix.train "$CONFIG" "$@"
