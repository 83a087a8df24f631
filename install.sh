#!/usr/bin/env bash
# Set up a virtual environment for `unix` (idempotent). CPU machines get the CPU torch wheel;
# CUDA machines get CUDA torch and, when it builds, flash-attn. Never contacts a model hub.
#   bash install.sh            # .venv in the repo, CPU or CUDA chosen automatically
#   UNIX_VENV=/path bash install.sh
#   UNIX_EXTRAS=eval,demo bash install.sh
set -euo pipefail
cd "$(dirname "$0")"
VENV=${UNIX_VENV:-.venv}
PY=${PYTHON:-python3}
TORCH_VERSION=${UNIX_TORCH_VERSION:-2.13.0}
EXTRAS=${UNIX_EXTRAS:-dev,eval}

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@"; }
pip install -q --upgrade pip >/dev/null 2>&1 || true

has_cuda=0
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && has_cuda=1

# torch first and pinned: anything that pulls torch unpinned resolves to a CUDA build + ~17 wheels.
if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '$TORCH_VERSION' else 1)" 2>/dev/null; then
  if [ "$has_cuda" = 1 ]; then
    pip install -q "torch==$TORCH_VERSION"
  else
    pip install -q "torch==$TORCH_VERSION" || pip install -q --index-url https://download.pytorch.org/whl/cpu "torch==$TORCH_VERSION"
  fi
fi
echo "torch==$TORCH_VERSION" > "$VENV/constraints.txt"

pip install -q -c "$VENV/constraints.txt" -e ".[$EXTRAS]"

# torchvision breaks transformers and diffusers imports against this torch: keep it out.
if "$VENV/bin/python" -c "import importlib.util as u, sys; sys.exit(0 if u.find_spec('torchvision') else 1)"; then
  echo "removing torchvision (incompatible with torch $TORCH_VERSION here)"
  pip uninstall -y -q torchvision
fi

if [ "$has_cuda" = 1 ]; then
  pip install -q -c "$VENV/constraints.txt" flash-attn --no-build-isolation \
    || echo "flash-attn did not build: the SDPA / FlexAttention backends will be used"
fi
"$VENV/bin/python" -c "import unix, torch; print(f'unix {unix.__version__} ready (torch {torch.__version__}, cuda={torch.cuda.is_available()})')"
