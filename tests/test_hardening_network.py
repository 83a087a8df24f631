"""Issue 28, network: `unix eval reports` with RadGraph must not reach the internet. The command runs
in a fresh interpreter whose environment has no offline switch, with every socket connection
refused and recorded (sitecustomize), and a stand-in `radgraph` package that records what the
Hugging Face libraries saw when it was imported and tries the download the real one would make."""

import json
import os
import subprocess
import sys
import textwrap

SITECUSTOMIZE = """
import json, os, socket

LOG = os.environ["UNIX_TEST_NET_LOG"]

def refuse(*args, **kwargs):
    with open(LOG, "a") as f:
        f.write(json.dumps({"connect": repr(args[1:] or args)}) + "\\n")
    raise OSError("network blocked by the test")

socket.socket.connect = refuse
socket.socket.connect_ex = refuse
socket.create_connection = refuse
"""

FAKE_RADGRAPH = """
import json, os

LOG = os.environ["UNIX_TEST_NET_LOG"]
seen = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
import huggingface_hub.constants
seen["hub_constant"] = huggingface_hub.constants.HF_HUB_OFFLINE
with open(LOG, "a") as f:
    f.write(json.dumps({"import": seen}) + "\\n")


class RadGraph:
    def __init__(self, model_type=None, model_cache_dir=None, cuda=-1, **kwargs):
        from huggingface_hub import hf_hub_download

        try:  # what radgraph 0.1.18 does for its archive (and transformers for its BERT)
            hf_hub_download("StanfordAIMI/RRG_scorers", "radgraph.tar.gz", cache_dir=model_cache_dir)
            outcome = "downloaded"
        except Exception as e:
            outcome = type(e).__name__
        with open(LOG, "a") as f:
            f.write(json.dumps({"download": outcome}) + "\\n")

    def __call__(self, reports):
        return {str(i): {"entities": {str(j): {"tokens": w, "label": "OBS-DP", "relations": []}
                                      for j, w in enumerate(r.lower().split())}} for i, r in enumerate(reports)}
"""


def test_eval_reports_with_radgraph_stays_offline(tmp_path):
    site = tmp_path / "site"
    (site / "radgraph").mkdir(parents=True)
    (site / "sitecustomize.py").write_text(textwrap.dedent(SITECUSTOMIZE))
    (site / "radgraph" / "__init__.py").write_text(textwrap.dedent(FAKE_RADGRAPH))
    model = tmp_path / "rg" / "radgraph"
    model.mkdir(parents=True)
    for name in ("config.json", "weights.th"):
        (model / name).write_text("{}")
    (tmp_path / "pred.csv").write_text("id,report\na,Small effusion.\nb,Lungs clear.\n")
    (tmp_path / "ref.csv").write_text("id,report\na,Small right effusion.\nb,Lungs clear.\n")
    log = tmp_path / "net.jsonl"
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY")}
    env.update(PYTHONPATH=str(site), UNIX_TEST_NET_LOG=str(log), HF_HOME=str(tmp_path / "hf"))
    done = subprocess.run([sys.executable, "-m", "unix.cli", "eval", "reports", "--pred", str(tmp_path / "pred.csv"),
                           "--ref", str(tmp_path / "ref.csv"), "--radgraph-dir", str(tmp_path / "rg"), "--out", str(tmp_path / "r.json")],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    events = [json.loads(line) for line in log.read_text().splitlines()]
    assert not [e for e in events if "connect" in e], events  # not one connection was tried
    imported = next(e["import"] for e in events if "import" in e)
    assert imported == {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "hub_constant": True}
    assert next(e["download"] for e in events if "download" in e) in ("LocalEntryNotFoundError", "OfflineModeIsEnabled")
    assert "f1-radgraph" in json.loads((tmp_path / "r.json").read_text())


def test_radgraph_that_cannot_load_is_one_line(tmp_path, monkeypatch):
    import types

    import pytest

    from unix.errors import UserError
    from unix.eval.radgraph import load_annotator

    class Failing:
        def __init__(self, **kwargs):
            raise Exception("We couldn't connect to 'https://huggingface.co' to load this file\nmore lines")

    monkeypatch.setitem(sys.modules, "radgraph", types.SimpleNamespace(RadGraph=Failing))
    (tmp_path / "radgraph").mkdir()
    for name in ("config.json", "weights.th"):
        (tmp_path / "radgraph" / name).write_text("{}")
    with pytest.raises(UserError, match=r"radgraph: RadGraph did not load \(Exception: We couldn't connect.*local Hugging Face cache") as e:
        load_annotator(tmp_path)
    assert "\n" not in str(e.value)
