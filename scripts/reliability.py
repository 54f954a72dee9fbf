#!/usr/bin/env python3
"""Run the reliability suites and rewrite the figures section of docs/RELIABILITY.md.

    python scripts/reliability.py            # as CI runs them (ten kills, a 5-minute soak), about 8 min
    python scripts/reliability.py --slow     # and longer fuzzing and any slow-marked test

The tests append their counts (faults injected and survived, inputs tried, requests served,
errors) as JSON lines to the file named by BEHEMOTH_RELIABILITY_FIGURES; this script points that
at a temporary file, runs pytest on tests/test_reliability_*.py, sums the lines per suite and
replaces the text between the figures markers in the document. The exit code is pytest's.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "RELIABILITY.md"
SUITES = ["tests/test_reliability_training.py", "tests/test_reliability_files.py", "tests/test_reliability_server.py"]
START, END = "<!-- figures:start -->", "<!-- figures:end -->"
# Figures that describe one measurement rather than add up over tests.
LAST_VALUE = {"seconds", "clients", "rss_start_mb", "rss_end_mb", "fds_start", "fds_end", "source_files_scanned",
              "restricted_unpicklers", "steps_compared"}

Counts = dict[str, float]
ROWS: list[tuple[str, str, Callable[[Counts], str]]] = [
    ("sigkill", "SIGKILL while training (checkpoint every step)",
     lambda c: f"{c['kills']:.0f} kills ({c['kills_inside_save']:.0f} inside a checkpoint write), {c['resumes']:.0f} "
               f"resumes; {c['checkpoints_verified']:.0f} checkpoint verifications passed; losses bit-identical "
               "to an uninterrupted run"),
    ("disk_full", "Disk full while saving a checkpoint",
     lambda c: f"{c['faults']:.0f} injected (RLIMIT_FSIZE, full tmpfs), {c['survived']:.0f} survived: one-line "
               "error, previous checkpoint intact"),
    ("nan_inf", "NaN/Inf loss or gradient",
     lambda c: f"{c['faults']:.0f} injected, {c['skipped']:.0f} steps skipped and logged, "
               f"{c.get('stopped', 0):.0f} run stopped after max_bad_steps in a row"),
    ("data_damage", "Damaged token shards or changed sources",
     lambda c: f"{c['faults']:.0f} damages, {c['detected']:.0f} detected and named before training"),
    ("untrusted_files", "Pickle-bearing weight files",
     lambda c: f"{c['pickle_files_refused']:.0f} refused without unpickling; {c['source_files_scanned']:.0f} source "
               f"files scanned, no unpickling call ({c['restricted_unpicklers']:.0f} restricted unpickler)"),
    ("lying_headers", "Lying safetensors headers", lambda c: f"{c['cases_refused']:.0f} kinds of lie refused"),
    ("fuzz_safetensors_header", "Fuzzed safetensors files", lambda c: f"{c['inputs']:.0f} inputs, 0 untyped errors"),
    ("fuzz_config_json", "Fuzzed config.json", lambda c: f"{c['inputs']:.0f} inputs, 0 untyped errors"),
    ("fuzz_run_toml", "Fuzzed run TOML and --set", lambda c: f"{c['inputs']:.0f} inputs, 0 untyped errors"),
    ("api_fuzz", "schemathesis requests (valid and invalid)",
     lambda c: f"{c['requests']:.0f} requests: {c['ok']:.0f} answered 200, {c['rejected_4xx']:.0f} refused with "
               f"a 4xx, {c['server_errors']:.0f} 5xx"),
    ("server_attacks", "Hostile clients",
     lambda c: f"{c['slow_clients_timed_out']:.0f} trickling bodies timed out (408), {c['hostile_requests']:.0f} "
               f"hostile header/key requests refused, a {c['burst_requests']:.0f}-request burst limited exactly"),
    ("shutdown", "Shutdown with requests in flight",
     lambda c: f"{c['requests_in_flight']:.0f} in flight: {c.get('finished', 0):.0f} finished, "
               f"{c.get('clean_errors', 0):.0f} clean 503s; {c['half_written_audit_lines']:.0f} half-written audit lines"),
    ("soak", "Soak",
     lambda c: f"{c['clients']:.0f} clients for {c['seconds']:.0f} s: {c['requests']:.0f} requests, {c['ok']:.0f} "
               f"complete, {c['errors']:.0f} errors; RSS {c['rss_start_mb']:.0f} -> {c['rss_end_mb']:.0f} MiB, "
               f"open fds {c['fds_start']:.0f} -> {c['fds_end']:.0f}"),
]


def run_suites(slow: bool, soak_seconds: float, figures: Path) -> tuple[int, str, float]:
    """(pytest's exit code, its summary line, seconds)."""
    env = {**os.environ, "BEHEMOTH_RELIABILITY_FIGURES": str(figures), "BEHEMOTH_SOAK_SECONDS": str(soak_seconds)}
    command = [sys.executable, "-m", "pytest", *SUITES, "-q", "-p", "no:cacheprovider"]
    if slow:
        command += ["-m", "slow or not slow"]
        env.update(BEHEMOTH_FUZZ_EXAMPLES="2000", BEHEMOTH_API_FUZZ_EXAMPLES="150")
    started = time.monotonic()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    sys.stdout.write(done.stdout[-3000:])
    sys.stderr.write(done.stderr[-3000:])
    lines = [line.strip("= ") for line in done.stdout.splitlines() if re.search(r"\d+ (passed|failed)", line)]
    return done.returncode, (lines[-1] if lines else "no summary"), time.monotonic() - started


def collect(figures: Path) -> dict[str, Counts]:
    totals: dict[str, Counts] = {}
    if not figures.exists():
        return totals
    for line in figures.read_text().splitlines():
        entry = json.loads(line)
        suite = totals.setdefault(entry.pop("suite"), {})
        for key, value in entry.items():
            suite[key] = value if key in LAST_VALUE else suite.get(key, 0) + value
    return totals


def render(totals: dict[str, Counts], summary: str, seconds: float, slow: bool) -> str:
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    mode = "every test, slow ones included" if slow else "the default (fast) tests only"
    lines = [START, "", f"Measured {when} by `python scripts/reliability.py{' --slow' if slow else ''}` ({mode}): "
             f"{summary}; {seconds:.0f} s in all.", "", "| fault or input | figures |", "| --- | --- |"]
    for suite, label, describe in ROWS:
        if suite in totals:
            try:
                text = describe(totals[suite])
            except KeyError as missing:
                text = f"incomplete figures (no {missing})"
            lines.append(f"| {label} | {text} |")
        else:
            lines.append(f"| {label} | not run |")
    return "\n".join(lines + ["", END])


def rewrite(doc: Path, section: str) -> None:
    text = doc.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{doc}: no {START} ... {END} section to rewrite")
    before, rest = text.split(START, 1)
    after = rest.split(END, 1)[1]
    doc.write_text(before + section + after)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slow", action="store_true", help="also longer fuzzing and any slow-marked test")
    parser.add_argument("--soak-seconds", type=float, default=300.0, help="soak duration (default 300, as in CI)")
    parser.add_argument("--doc", type=Path, default=DOC, help="the document to rewrite")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        figures = Path(tmp) / "figures.jsonl"
        code, summary, seconds = run_suites(args.slow, args.soak_seconds, figures)
        totals = collect(figures)
    rewrite(args.doc, render(totals, summary, seconds, args.slow))
    print(f"\nfigures written to {args.doc} ({summary})")
    return code


if __name__ == "__main__":
    sys.exit(main())
