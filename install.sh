#!/usr/bin/env bash
# Set up a virtual environment for `unix` (idempotent). Never contacts a model hub.
#   bash install.sh                     # .venv in the repo
#   UNIX_VENV=/path bash install.sh     # elsewhere
#   UNIX_EXTRAS=eval,demo bash install.sh
#   UNIX_WHEELS=gpu_wheels bash install.sh   # no registry reachable: missing packages from this folder
#   UNIX_FLASH_ATTN=1 bash install.sh   # also try flash-attn on a CUDA machine (a source build can take an hour)
#
# torch: a suitable torch that is already there (in the venv, or in the python that makes it: a CUDA
# image, a cluster module) is kept, never reinstalled; otherwise torch==$UNIX_TORCH_VERSION is installed
# (the CPU wheel here, the CUDA one on a GPU machine). Where no package registry answers, unix is
# installed from UNIX_WHEELS if given, else without its dependencies, and the missing ones are named.
set -euo pipefail
cd "$(dirname "$0")"
VENV=${UNIX_VENV:-.venv}
PY=${PYTHON:-python3}
TORCH_VERSION=${UNIX_TORCH_VERSION:-2.13.0}
TORCH_FLOOR=2.4  # pyproject's torch>=2.4
EXTRAS=${UNIX_EXTRAS:-dev,eval}
WHEELS=${UNIX_WHEELS:-}
PROBE_S=${UNIX_PIP_PROBE_TIMEOUT:-15}  # seconds the registry gets to answer once, with no retries
NET=(--timeout "${UNIX_PIP_TIMEOUT:-60}")

has_cuda=0
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && has_cuda=1

# A torch that will do: at least the floor and, on a GPU machine, one that sees the GPU.
# UNIX_TORCH_VERSION, when set, asks for exactly that version.
torch_ok() {
  "$1" - "$TORCH_FLOOR" "$has_cuda" "${UNIX_TORCH_VERSION:-}" <<'EOF' 2>/dev/null
import sys
import torch
floor, cuda, want = sys.argv[1], sys.argv[2] == "1", sys.argv[3]
version = torch.__version__.split("+")[0]
num = lambda v: tuple(int(x) for x in v.split(".")[:2])
ok = version == want if want else num(version) >= num(floor) and (torch.cuda.is_available() or not cuda)
sys.exit(0 if ok else 1)
EOF
}

if [ ! -x "$VENV/bin/python" ]; then
  if torch_ok "$PY"; then
    # The venv sees the packages of the python that makes it (torch, CUDA libraries, ...) and installs
    # only what is missing. When that python is a venv itself, "system" packages are its base's,
    # so its own site-packages are added by a .pth file.
    echo "using the torch already installed for $PY ($("$PY" -c 'import torch; print(torch.__version__)'))"
    "$PY" -m venv --system-site-packages "$VENV"
    parent=$("$PY" -c "import site, sys; print(site.getsitepackages()[0] if sys.prefix != sys.base_prefix else '')")
    if [ -n "$parent" ]; then
      own=$("$VENV/bin/python" -c "import site; print(site.getsitepackages()[0])")
      echo "import site; site.addsitedir('$parent')" >"$own/_unix_parent_env.pth"
    fi
  else
    "$PY" -m venv "$VENV"
  fi
fi
pip() { "$VENV/bin/python" -m pip "$@"; }

online=1
if ! pip index versions pip --timeout "$PROBE_S" --retries 0 >/dev/null 2>&1; then
  online=0
  echo "no package registry answered within ${PROBE_S}s: installing offline${WHEELS:+ from $WHEELS}"
fi
[ "$online" = 1 ] && { pip install -q "${NET[@]}" --upgrade pip >/dev/null 2>&1 || true; }

# torch first and pinned: anything that pulls torch unpinned resolves to a CUDA build + ~17 wheels.
if ! torch_ok "$VENV/bin/python"; then
  if [ "$online" = 0 ]; then
    echo "error: no suitable torch in $VENV and no package registry: install torch>=$TORCH_FLOOR for $PY first" \
         "(or make the venv from a python that has it: PYTHON=/path/to/python bash install.sh)" >&2
    exit 1
  elif [ "$has_cuda" = 1 ]; then
    pip install -q "${NET[@]}" "torch==$TORCH_VERSION"
  else
    pip install -q "${NET[@]}" "torch==$TORCH_VERSION" || pip install -q "${NET[@]}" --index-url https://download.pytorch.org/whl/cpu "torch==$TORCH_VERSION"
  fi
fi
echo "torch==$("$VENV/bin/python" -c 'import torch; print(torch.__version__)')" >"$VENV/constraints.txt"

# Imports `unix` needs at run time, module:distribution (what an offline install may lack).
NEEDED="transformers:transformers diffusers:diffusers safetensors:safetensors omegaconf:omegaconf numpy:numpy
PIL:pillow pyarrow:pyarrow tqdm:tqdm tokenizers:tokenizers requests:requests"
missing() {
  local m
  for m in $NEEDED; do "$VENV/bin/python" -c "import importlib.util as u, sys; sys.exit(u.find_spec('${m%%:*}') is None)" || echo "${m#*:}"; done
}
if [ "$online" = 1 ]; then
  pip install -q "${NET[@]}" -c "$VENV/constraints.txt" -e ".[$EXTRAS]"
elif [ -n "$WHEELS" ] && pip install -q --no-index --find-links "$WHEELS" -c "$VENV/constraints.txt" -e ".[$EXTRAS]"; then
  echo "installed unix[$EXTRAS] from $WHEELS"
elif [ -n "$WHEELS" ] && pip install -q --no-index --find-links "$WHEELS" -c "$VENV/constraints.txt" -e .; then
  echo "installed unix from $WHEELS (not the extras $EXTRAS: their wheels are not all there)"
else
  echo "offline: installing unix without its dependencies (pip install --no-deps -e .)"
  if ! pip install -q --no-index --no-deps --no-build-isolation -e . >/dev/null 2>&1; then
    # No setuptools >= 68 here to build the editable install with (a python 3.11 venv bundles an older
    # one): put the tree on the venv's path and add the command.
    site_dir=$("$VENV/bin/python" -c "import site; print(site.getsitepackages()[0])")
    echo "$PWD" >"$site_dir/_unix_tree.pth"
    printf '#!/bin/sh\nexec "%s" -m unix.cli "$@"\n' "$(cd "$VENV" && pwd)/bin/python" >"$VENV/bin/unix"
    chmod +x "$VENV/bin/unix"
    echo "the editable install needs setuptools>=68 (add its wheel to UNIX_WHEELS): $PWD is on $VENV's path instead"
  fi
fi

# torchvision broken against this torch (a CUDA build beside CPU torch) breaks transformers and
# diffusers imports: remove it from the venv. One that imports (a matching CUDA pair) stays.
if "$VENV/bin/python" -c "import importlib.util as u, sys; sys.exit(0 if u.find_spec('torchvision') else 1)" \
   && ! "$VENV/bin/python" -c "import torchvision" >/dev/null 2>&1; then
  echo "removing torchvision (it does not import with torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)'))"
  pip uninstall -y -q torchvision || echo "warning: torchvision lies outside $VENV and does not import: remove it there" >&2
fi

if [ "$has_cuda" = 1 ]; then
  if "$VENV/bin/python" -c "import flash_attn" >/dev/null 2>&1; then
    echo "flash-attn is installed: attention backend 'auto' uses it"
  elif [ "${UNIX_FLASH_ATTN:-0}" = 1 ] && { [ "$online" = 1 ] || [ -n "$WHEELS" ]; }; then
    src=("${NET[@]}"); [ "$online" = 0 ] && src=(--no-index --find-links "$WHEELS")
    pip install -q "${src[@]}" -c "$VENV/constraints.txt" flash-attn --no-build-isolation \
      || echo "flash-attn did not install: the SDPA / FlexAttention backends will be used"
  else
    echo "flash-attn not installed (UNIX_FLASH_ATTN=1 tries to; without a prebuilt wheel it builds from source, which takes long):" \
         "the SDPA / FlexAttention backends will be used"
  fi
fi

lacking=$(missing | tr '\n' ' ')
if [ -n "${lacking// }" ]; then
  echo "WARNING: unix is installed but these packages are missing: $lacking" >&2
  echo "  where a registry is reachable: PY_VERSION=$("$VENV/bin/python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")') bash scripts/gpu_wheels.sh $lacking" >&2
  echo "  then here: UNIX_WHEELS=that/folder bash install.sh" >&2
  exit 0
fi
"$VENV/bin/python" -c "import unix, torch; print(f'unix {unix.__version__} ready (torch {torch.__version__}, cuda={torch.cuda.is_available()})')"
