"""What `serve --guard` buys on the closed path: the attack success rate of a chat model through the
API, without and with the guard, and what the guard costs in over-refusal.

    .venv/bin/python bench/safety_guard.py --model CHAT_MODEL_DIR [--guard keywords] [--limit N] [--no-write]

Starts `behemoth serve` twice on 127.0.0.1 (a free port, a fresh key): once plain, once with
`--guard GUARD` (default: the keyword guard). Each time it sends the `refusal` task (AdvBench from
../shared/data/safety, else the project's held-out prompts) and the `overrefusal` task (XSTest's
benign half) through /v1/chat/completions (`eval.safety.safety_through_api`, greedy, 48 tokens) and
judges the replies with the string classifier. Reports attack success rate and benign compliance
with 95% bootstrap intervals, side by side, and the ratio of the two attack success rates.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import Figure, finish  # noqa: E402
from serve_load import start_server  # noqa: E402


def measure(model_dir: Path, limit: int | None, *guard: str) -> dict[str, dict]:
    from behemoth.eval.safety import safety_through_api

    with tempfile.TemporaryDirectory() as work:
        process, url, key = start_server(model_dir, Path(work), 32, *guard)
        try:
            return {task: safety_through_api(url, "bench", task, api_key=key, limit=limit)["metrics"]
                    for task in ("refusal", "overrefusal")}
        finally:
            process.terminate()
            process.wait(timeout=60)


def cell(metrics: dict, name: str) -> str:
    low, high = metrics[f"{name}_ci"]
    return f"{metrics[name]:.1%} [{low:.1%}, {high:.1%}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="a chat model directory")
    parser.add_argument("--guard", default="keywords", help="the --guard SPEC to compare (default keywords)")
    parser.add_argument("--limit", type=int, help="items per task (default: all)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args()
    args.json, args.quick, args.write = None, False, False
    plain = measure(args.model, args.limit)
    guarded = measure(args.model, args.limit, "--guard", args.guard)
    asr = (plain["refusal"]["attack_success_rate"], guarded["refusal"]["attack_success_rate"])
    rows = [("attack success rate (AdvBench, lower is safer)", cell(plain["refusal"], "attack_success_rate"),
             cell(guarded["refusal"], "attack_success_rate")),
            ("benign compliance (XSTest safe half, higher is better)", cell(plain["overrefusal"], "compliance_rate"),
             cell(guarded["overrefusal"], "compliance_rate"))]
    body = "\n".join([
        f"`bench/safety_guard.py --model {args.model} --guard {args.guard}`: the same chat model through "
        "`behemoth serve`'s API, without and with the guard; replies judged by the string classifier; "
        "95% bootstrap intervals.", "",
        "| through the API | no guard | `--guard " + args.guard + "` |", "|---|---|---|",
        *[f"| {name} | {a} | {b} |" for name, a, b in rows], "",
        f"Attack success rate with the guard / without: {asr[1] / asr[0]:.2f}x" if asr[0] else
        "The model refused every harmful request without the guard already."])
    finish(args, "Safety through the API: with and without serve --guard", body,
           [Figure("guarded/plain attack success rate", asr[1] / asr[0] if asr[0] else 0.0, "x")])


if __name__ == "__main__":
    main()
