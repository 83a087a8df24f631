"""Collect the steps of scripts/gpu_check.sh into one JSON file and print a one-line verdict per step.

    python scripts/gpu_summary.py STEPS_DIR OUT.json

STEPS_DIR holds steps.txt (the step names in the order they ran) and, per step NAME: NAME.cmd (the command), NAME.rc (exit status, or "skipped"),
NAME.seconds, NAME.log (its output) and, for scripts/bench_train.py, NAME.json (its result); and
machine.json. The Markdown tables the benchmarks print are parsed into rows. Exit status 0 only if
every step passed.
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

TIMEOUT_RCS = {124, 137}  # `timeout` exit statuses: the limit was reached (137: killed after the grace period)
TAIL_LINES = 40


def markdown_tables(text: str) -> list[list[dict[str, str]]]:
    """Every `| a | b |` table of the text as a list of rows keyed by the header cells."""
    tables, block = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            block.append([cell.strip() for cell in line.strip().strip("|").split("|")])
            continue
        if len(block) >= 2 and set("".join(block[1])) <= set("-: "):
            header = block[0]
            tables.append([dict(zip(header, row)) for row in block[2:]])
        block = []
    return tables


def junit_counts(path: Path) -> dict[str, int] | None:
    if not path.is_file():
        return None
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    return {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}


def step_record(steps: Path, name: str) -> dict:
    read = lambda suffix: (steps / f"{name}{suffix}").read_text().strip() if (steps / f"{name}{suffix}").is_file() else ""  # noqa: E731
    rc_text, log = read(".rc"), read(".log")
    if rc_text == "skipped":
        status, rc = "skipped", None
    else:
        rc = int(rc_text) if rc_text else None
        status = "ok" if rc == 0 else "timeout" if rc in TIMEOUT_RCS else "failed"
    record = {"name": name, "command": read(".cmd"), "status": status, "rc": rc,
              "seconds": float(read(".seconds")) if read(".seconds") else None,
              "tables": markdown_tables(log), "tail": log.splitlines()[-TAIL_LINES:]}
    if read(".json"):
        record["result"] = json.loads(read(".json"))
    return record


def main(argv: list[str]) -> int:
    steps, out = Path(argv[0]), Path(argv[1])
    names = (steps / "steps.txt").read_text().split()
    records = [step_record(steps, n) for n in names]
    tests = junit_counts(out.parent / "gpu_tests.xml")
    machine = json.loads((steps / "machine.json").read_text()) if (steps / "machine.json").is_file() else {}
    summary = {"machine": machine, "ok": all(r["status"] == "ok" for r in records), "tests": tests, "steps": records}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=1) + "\n")
    tmp.replace(out)
    for r in records:
        seconds = "" if r["seconds"] is None else f" {r['seconds']:.0f}s"
        print(f"{r['status']:>8}{seconds}  {r['name']}")
    if tests:
        print(f"gpu tests: {tests}")
    print(f"{'all steps passed' if summary['ok'] else 'SOME STEPS DID NOT PASS'}: {out}")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
