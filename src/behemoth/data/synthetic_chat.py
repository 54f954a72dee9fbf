"""Small chat and preference data the project generates itself, for the speedrun's SFT and DPO.

Templated tasks a tiny model can learn in minutes and whose answers are checkable: adding small
numbers, naming the next number, repeating a word, and spelling a word backwards. Preference pairs
put the correct answer against a wrong one, so DPO's preference accuracy means something.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = ("light", "water", "bread", "stone", "river", "mountain", "garden", "shepherd", "city", "house",
         "king", "star", "field", "seed", "tree", "voice", "road", "door", "fire", "cloud")


def _task(rng: random.Random) -> tuple[str, str, str]:
    """(question, correct answer, wrong answer)."""
    kind = rng.randrange(4)
    if kind == 0:
        a, b = rng.randrange(1, 20), rng.randrange(1, 20)
        wrong = a + b + rng.choice((-2, -1, 1, 2))
        return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.", f"{a} plus {b} is {wrong}."
    if kind == 1:
        n = rng.randrange(1, 99)
        return f"Which number comes after {n}?", f"The number after {n} is {n + 1}.", f"The number after {n} is {n - 1}."
    word = rng.choice(WORDS)
    if kind == 2:
        times = rng.randrange(2, 5)
        return (f"Say the word {word} {times} times.", " ".join([word] * times) + ".",
                " ".join([word] * (times + 1)) + ".")
    return f"Spell {word} backwards.", f"{word} backwards is {word[::-1]}.", f"{word} backwards is {word}."


def write_chat_data(out_dir: Path, conversations: int = 2000, pairs: int = 1000, seed: int = 0
                    ) -> tuple[Path, Path]:
    """Write sft.jsonl (messages form) and dpo.jsonl (prompt/chosen/rejected) into out_dir."""
    rng = random.Random(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    sft_path, dpo_path = out_dir / "sft.jsonl", out_dir / "dpo.jsonl"
    with open(sft_path, "w") as sft_file:
        for _ in range(conversations):
            question, answer, _ = _task(rng)
            messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            sft_file.write(json.dumps({"messages": messages}) + "\n")
    with open(dpo_path, "w") as dpo_file:
        for _ in range(pairs):
            question, answer, wrong = _task(rng)
            row = {"prompt": [{"role": "user", "content": question}], "chosen": answer, "rejected": wrong}
            dpo_file.write(json.dumps(row) + "\n")
    return sft_path, dpo_path
