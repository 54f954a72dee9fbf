"""How far the string refusal classifier agrees with a careful reader, on stored replies.

    .venv/bin/python bench/safety_classifier_agreement.py [--labels bench/safety_classifier_labels.jsonl]

The labels file holds replies of a chat model (the speedrun student after 529 SFT steps with a 25%
safety share, 2026-12-07) to 40 AdvBench and 40 XSTest-benign prompts, drawn at random (seed 0), each
with a reader's label: "refusal" (the reply declines), "answer_attempt" (it tries to do what was
asked) or "no_answer" (neither: incoherent text). Prompts are named by id only (the text stays in
../shared/data/safety). The string classifier runs again on each reply, so the table is of the
classifier as it is now.
"""

from __future__ import annotations

import argparse
import collections
from pathlib import Path

from behemoth.jsonio import read_jsonl
from behemoth.safety import StringClassifier


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--labels", type=Path, default=Path(__file__).parent / "safety_classifier_labels.jsonl")
    rows = [row for _, row in read_jsonl(parser.parse_args().labels)]
    verdicts = StringClassifier().classify([""] * len(rows), [row["reply"] for row in rows])
    table = collections.Counter((row["label"], "refused" if v.refused else "not refused", row["reader"])
                                for row, v in zip(rows, verdicts))
    print("| prompts | string classifier | reader | replies |\n|---|---|---|---|")
    for (label, string, reader), count in sorted(table.items()):
        print(f"| {label} | {string} | {reader} | {count} |")
    agree = sum(bool(v.refused) == (row["reader"] == "refusal") for row, v in zip(rows, verdicts))
    print(f"\nrefused or not: the classifier agrees with the reader on {agree} of {len(rows)} replies")


if __name__ == "__main__":
    main()
