"""scripts/probe_conditioning.py on the shipped model and a small phantom test split."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from unix.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("probe") / "data"
    assert main(["data", "phantom", "--out", str(out), "--n", "40", "--seed", "3"]) == 0
    return out


def probe(data, batch_size):
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "probe_conditioning.py"), "--data", str(data), "--n", "4",
                          "--batch-size", str(batch_size)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout)


def test_probe_shuffles_prompts_within_a_batch(data):
    alone, together = probe(data, 1), probe(data, 4)
    assert alone["n"] == together["n"] == 4
    assert alone["shuffled"] == alone["own"]  # a batch of one has no other report to swap in
    assert together["shuffled"] != together["own"] and together["none"] != together["own"]
    assert together["own"] == pytest.approx(alone["own"], rel=1e-4)  # same rows, timesteps and noise
