#!/usr/bin/env bash
# Build, where pip reaches a package registry, the wheel folder that scripts/gpu_check.sh (WHEELS=...)
# and install.sh (UNIX_WHEELS=...) install from on a GPU machine that reaches none.
#
#   bash scripts/gpu_wheels.sh                          # the default list, for Python 3.12, into gpu_wheels/
#   PY_VERSION=3.11 WHEELS=/tmp/w bash scripts/gpu_wheels.sh diffusers omegaconf   # only these
#
# The default list is what `unix` and its GPU check import beyond what a CUDA image usually holds
# (CUDA torch, triton, transformers, accelerate, safetensors and their requirements: numpy,
# huggingface_hub, tokenizers, tqdm, pyyaml, regex, filelock, packaging): the requirement closure of
# pyproject's dependencies + pytest, less that of torch + transformers + accelerate + safetensors,
# as resolved in .venv (2026-12). importlib-metadata, zipp and lazy-importer are never imported on
# Python >= 3.8, but diffusers declares the first, so install.sh's resolving install needs them
# (gpu_check.sh installs without resolving and skips them), and setuptools builds its editable
# install. On a machine that has some of these,
# name only the missing ones: gpu_check.sh prints them. Versions are the ones installed in .venv
# (tested here), else the newest for PY_VERSION.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=${WHEELS:-gpu_wheels}
PY_VERSION=${PY_VERSION:-3.12}
PY=${PYTHON:-.venv/bin/python}
DEFAULT="diffusers omegaconf pillow pyarrow einops requests urllib3 certifi charset-normalizer idna pytest iniconfig pluggy
importlib-metadata zipp lazy-importer setuptools"
NAMES=${*:-$DEFAULT}
# omegaconf before 2.4 parses interpolations with an ANTLR runtime that later releases dropped
if "$PY" -c "import importlib.metadata as m, sys; sys.exit(not any('antlr4' in r for r in m.requires('omegaconf') or []))" 2>/dev/null; then
  NAMES="$NAMES antlr4-python3-runtime"
fi
TAGS=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  TAGS+=(--platform "$tag")
done
mkdir -p "$WHEELS"
for name in $NAMES; do
  version=$("$PY" -c "import importlib.metadata as m; print(m.version('$name'))" 2>/dev/null || true)
  spec=$name${version:+==$version}
  echo "$spec"
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
    "${TAGS[@]}" -d "$WHEELS" "$spec"
done
du -sh "$WHEELS"
echo "copy $WHEELS/ to the GPU machine, then: WHEELS=$WHEELS bash scripts/gpu_check.sh"
