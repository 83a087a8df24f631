"""scripts/gpu_summary.py: the step records of scripts/gpu_check.sh become one JSON file and a verdict."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gpu_summary", ROOT / "scripts" / "gpu_summary.py")
summary = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(summary)


def test_markdown_tables_become_rows():
    text = "preset=unix\n| backend | ms |\n|---|---|\n| sdpa | 1.5 |\n| flash | 0.9 |\nnote\n| a | b |\n|:-|-:|\n| 1 | 2 |"
    assert summary.markdown_tables(text) == [[{"backend": "sdpa", "ms": "1.5"}, {"backend": "flash", "ms": "0.9"}],
                                             [{"a": "1", "b": "2"}]]


def _step(steps: Path, name: str, rc: str, log: str = "", result: dict | None = None):
    (steps / f"{name}.cmd").write_text(f"python {name}.py\n")
    (steps / f"{name}.rc").write_text(rc + "\n")
    (steps / f"{name}.log").write_text(log)
    if rc != "skipped":
        (steps / f"{name}.seconds").write_text("1.250\n")
    if result is not None:
        (steps / f"{name}.json").write_text(json.dumps(result))
    with open(steps / "steps.txt", "a") as f:
        f.write(name + "\n")


def test_statuses_order_and_exit_code(tmp_path, capsys):
    steps, out = tmp_path / "steps", tmp_path / "out" / "gpu_check.json"
    steps.mkdir()
    _step(steps, "train", "0", result={"mfu": 0.4})
    _step(steps, "infer", "124", log="| a |\n|---|\n| 1 |\n")  # `timeout` killed it
    _step(steps, "model", "skipped")
    assert summary.main([str(steps), str(out)]) == 1
    got = json.loads(out.read_text())
    assert [(s["name"], s["status"]) for s in got["steps"]] == [("train", "ok"), ("infer", "timeout"), ("model", "skipped")]
    assert got["steps"][0]["result"] == {"mfu": 0.4} and got["steps"][1]["tables"] == [[{"a": "1"}]]
    assert not got["ok"] and "SOME STEPS DID NOT PASS" in capsys.readouterr().out
    steps2 = tmp_path / "steps2"
    steps2.mkdir()
    _step(steps2, "train", "0")
    assert summary.main([str(steps2), str(out)]) == 0 and json.loads(out.read_text())["ok"]
