"""Measure every finding test under the perturbations that move float rounding, and write the table.

    python -m tests.findings                         # every perturbation, then docs/findings.md
    python -m tests.findings --runs default,threads=1 --log /tmp/findings.jsonl
    python -m tests.findings --table-only --log /tmp/findings.jsonl

Each run is ``pytest -m finding`` with one perturbation set in the environment (see
``tests/conftest.py``): PyTorch intra-op threads 1 and 2, the MC engine's channels-last off, its
chunk size forced, the seeds shifted. Every checked quantity is appended to ``--log`` (JSON lines);
the table gives, per quantity, its value under each perturbation, the threshold, and the smallest
margin — a finding whose margin is small under some perturbation is one another CPU can break.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

RUNS = {
    "default": {},
    "threads=1": {"DUBITO_TEST_THREADS": "1"},
    "threads=2": {"DUBITO_TEST_THREADS": "2"},
    "channels-last off": {"DUBITO_TEST_CHANNELS_LAST": "0"},
    "MC chunk 4": {"DUBITO_TEST_MC_CHUNK": "4"},
    "seed+1": {"DUBITO_TEST_SEED_OFFSET": "1"},
    "seed+2": {"DUBITO_TEST_SEED_OFFSET": "2"},
}


def _label(perturbation: dict) -> str:
    env = {f"DUBITO_TEST_{k.upper()}": v for k, v in perturbation.items()}
    return next(
        (name for name, values in RUNS.items() if values == env),
        ", ".join(f"{k}={v}" for k, v in perturbation.items()) or "default",
    )


def run(names: list[str], log: Path, select: str | None) -> None:
    for name in names:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DUBITO_TEST_")}
        env.update(RUNS[name], DUBITO_FINDINGS_LOG=str(log.resolve()))
        command = [
            sys.executable,
            "-m",
            "pytest",
            "-m",
            "finding",
            "-q",
            "-p",
            "no:cacheprovider",
            "--no-header",
            "-rN",
        ]
        if select:
            command += ["-k", select]
        started = time.perf_counter()
        print(f"[{name}] {' '.join(command)}", flush=True)
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        tail = done.stdout.strip().splitlines()[-1:] if done.stdout.strip() else []
        print(f"[{name}] exit {done.returncode} in {time.perf_counter() - started:.0f} s {tail}", flush=True)


def _margin(value: float, op: str, threshold: float) -> float:
    """How far ``value`` is on the right side of ``threshold``, relative to it (absolute when 0)."""
    gap = value - threshold if op in (">", ">=") else threshold - value
    return gap / abs(threshold) if threshold else gap


def table(log: Path) -> str:
    rows: dict[tuple[str, str, str, float], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    columns: list[str] = []
    for line in log.read_text().splitlines():
        if not line.strip():
            continue
        r = json.loads(line)
        column = _label(r["perturbation"])
        if column not in columns:
            columns.append(column)
        test = r["test"].split("::", 1)[-1]
        rows[
            (
                r["test"].split("::")[0].rsplit("/", 1)[-1],
                test,
                f"{r['quantity']}",
                r["op"] + " " + f"{r['threshold']:g}",
            )
        ][column].append(r["value"])
    order = [c for c in RUNS if c in columns] + [c for c in columns if c not in RUNS]
    lines = [
        "| test | quantity | asserted | " + " | ".join(order) + " | smallest margin |",
        "|---" * (len(order) + 4) + "|",
    ]
    for (file, test, quantity, asserted), values in rows.items():
        op, threshold = asserted.split(" ")
        cells, margins = [], []
        for c in order:
            got = values.get(c, [])
            cells.append(" / ".join(f"{v:.3g}" for v in got) if got else "–")
            margins += [_margin(v, op, float(threshold)) for v in got]
        worst = min(margins) if margins else float("nan")
        mark = " **fails**" if worst < 0 or (worst == 0 and op in (">", "<")) else ""
        shown = f"{worst:+.0%}" if float(threshold) else f"{worst:+.3g} (absolute)"
        lines.append(
            f"| `{file}::{test}` | {quantity} | {asserted} | " + " | ".join(cells) + f" | {shown}{mark} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, of: {', '.join(RUNS)}")
    parser.add_argument("--log", default="findings.jsonl", help="JSON-lines file the runs append to")
    parser.add_argument("-k", dest="select", help="pytest -k expression (a subset of the finding tests)")
    parser.add_argument("--table-only", action="store_true", help="only print the table of an existing --log")
    args = parser.parse_args(argv)
    log = Path(args.log)
    if not args.table_only:
        names = [n.strip() for n in args.runs.split(",") if n.strip()]
        unknown = [n for n in names if n not in RUNS]
        if unknown:
            parser.error(f"unknown runs {unknown}; known: {', '.join(RUNS)}")
        run(names, log, args.select)
    print(table(log))
    return 0


if __name__ == "__main__":
    sys.exit(main())
