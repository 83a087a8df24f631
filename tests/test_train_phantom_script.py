"""scripts/train_phantom.sh end to end, at a few steps per stage on the tiny preset (both lane layouts)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
UNIX = Path(sys.executable).parent / "unix"


@pytest.mark.skipif(not UNIX.is_file(), reason="the unix console script is not installed beside this python")
@pytest.mark.parametrize("parallel", ["1", "0"])
def test_train_phantom_script_runs_every_stage(tmp_path, parallel):
    env = {**os.environ, "UNIX": str(UNIX), "PRESET": "tiny", "N_IMAGES": "40", "VAE_STEPS": "2", "VISION_STEPS": "2",
           "S1_STEPS": "2", "S2_STEPS": "2", "DEC_STEPS": "2", "PARALLEL": parallel, "COPY": "0", "OMP_NUM_THREADS": "1"}
    shipped = (ROOT / "weights" / "phantom-tiny" / "model.safetensors").read_bytes()
    work = tmp_path / "work"
    done = subprocess.run(["bash", str(ROOT / "scripts" / "train_phantom.sh"), str(work)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    final = work / "stage2" / "final"
    assert json.loads((final / "train.json").read_text())["stages"] == ["und", "gen"]
    vae = json.loads((work / "vae" / "vae.json").read_text())
    exported = json.loads((final / "config.json").read_text())["unix_model"]["vae"]
    assert (exported["scale"], exported["shift"]) == (vae["scale"], vae["shift"])  # stage 0a's statistics reached stage 2
    # the model ships stage 0c's decoder on stage 0a's encoder
    final_vae = load_file(str(final / "vae" / "model.safetensors"))
    stage0a, stage0c = (load_file(str(work / d / "model.safetensors")) for d in ("vae", "vae_decoder"))
    assert all(torch.equal(final_vae[k], stage0c[k]) for k in stage0c)
    assert all(torch.equal(final_vae[k], stage0a[k]) for k in stage0a if k.startswith("encoder."))
    assert (ROOT / "weights" / "phantom-tiny" / "model.safetensors").read_bytes() == shipped  # COPY=0 leaves it
