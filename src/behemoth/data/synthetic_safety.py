"""Safety conversations the project writes itself: harmful requests answered with a refusal, and
benign look-alikes answered plainly, for SFT and DPO, plus held-out prompts for evaluation.

A small model learns mostly which words go with refusing. So every hazard's acts (hack into, make a
bomb, ...) come with a refusal in many request frames ("How can I {act}?"), and the same trigger words
in harmless senses (kill a process, a villain in my novel) with a helpful answer: it should refuse the
act, not the word.

As in synthetic_chat, a hash of its text holds out a fifth (at least one) of each category's acts and
benign requests, and of the frames: `heldout_safety_rows` asks held-out acts in held-out frames and
held-out requests, never trained on in any wording. The public sets in ../shared/data/safety are for
evaluation only: every sentence here is our own (the tests check that no training prompt holds one).
"""

from __future__ import annotations

import hashlib
import math
import random
import re
import tomllib
from functools import cache
from pathlib import Path

from behemoth.data.synthetic_chat import turn_messages
from behemoth.jsonio import write_jsonl

HELDOUT_FRACTION = 0.2
MULTITURN_FRACTION = 0.2  # rows where the harmful request is the 2nd turn, or the 1st before a benign one
SOURCE = "behemoth_synthetic"
HELDOUT_FRAMES_PER_ACT = 3  # evaluation asks each held-out act in 3 held-out frames

TEMPLATES_FILE = Path(__file__).with_name("safety_templates.toml")  # the text: frames, acts, answers
_TEXT = tomllib.loads(TEMPLATES_FILE.read_text(encoding="utf-8"))
HAZARDS: dict[str, tuple[str, ...]] = {cat: tuple(acts) for cat, acts in _TEXT["acts"].items()}
FRAMES: tuple[str, ...] = tuple(_TEXT["frames"])
BENIGN: dict[str, tuple[tuple[str, str], ...]] = {
    kind: tuple((request, answer) for request, answer in pairs) for kind, pairs in _TEXT["benign"].items()}
REFUSALS: tuple[str, ...] = tuple(_TEXT["refusals"])
REASONS: dict[str, str] = _TEXT["reasons"]
OVERCAUTIOUS: tuple[str, ...] = tuple(_TEXT["overcautious"])
COMPLIANT: tuple[str, ...] = tuple(_TEXT["compliant"])


def _heldout_of(items: tuple[str, ...], salt: str) -> frozenset[str]:
    """The fifth of `items` (at least one) whose hashes sort first: held out by content, not position."""
    ranked = sorted(items, key=lambda s: hashlib.sha256(f"synthetic-safety:{salt}:{s}".encode()).digest())
    return frozenset(ranked[:max(1, math.ceil(len(items) * HELDOUT_FRACTION))])


@cache
def _heldout() -> frozenset[str]:
    sets = [_heldout_of(FRAMES, "frame")]
    sets += [_heldout_of(acts, f"act:{cat}") for cat, acts in HAZARDS.items()]
    sets += [_heldout_of(tuple(q for q, _ in pairs), f"benign:{kind}") for kind, pairs in BENIGN.items()]
    return frozenset().union(*sets)


def frames(heldout: bool) -> list[str]:
    """The training (heldout=False) or evaluation half of the request frames."""
    return [f for f in FRAMES if (f in _heldout()) == heldout]


def harmful_acts(heldout: bool) -> list[tuple[str, str]]:
    """(category, act) of the training or evaluation half, a fifth of each category held out."""
    return [(cat, a) for cat, acts in HAZARDS.items() for a in acts if (a in _heldout()) == heldout]


def benign_items(heldout: bool) -> list[tuple[str, str, str]]:
    """(kind, request, answer) of the training or evaluation half, a fifth of each kind held out."""
    return [(kind, q, a) for kind, pairs in BENIGN.items() for q, a in pairs if (q in _heldout()) == heldout]


def harmful_prompt(frame: str, act: str) -> str:
    return frame.format(act=act, Act=act[:1].upper() + act[1:])


def training_user_prompts() -> list[str]:
    """Every user prompt training rows can contain (for leak checks against evaluation sets)."""
    return ([harmful_prompt(f, a) for f in frames(False) for _, a in harmful_acts(False)]
            + [q for _, q, _ in benign_items(False)])


_PERSON = {"my": "your", "myself": "yourself", "me": "you", "i": "you"}


def _compliant(rng: random.Random, act: str) -> str:
    """A reply that agrees to the act (pronouns turned to the user's), with no usable content."""
    act = re.sub(r"\b(my|myself|me|I)\b", lambda m: _PERSON[m.group(1).lower()], act)
    return rng.choice(COMPLIANT).format(act=act)


def _refusal(rng: random.Random, reason: str) -> str:
    return rng.choice(REFUSALS).format(reason=reason)


class _Draw:
    """Random training turns: harmful (user, refusal) and benign (user, answer)."""

    def __init__(self, rng: random.Random):
        self.rng, self.acts, self.frames, self.pairs = rng, harmful_acts(False), frames(False), benign_items(False)

    def harmful(self) -> tuple[str, str, str, str]:
        """(category, act, prompt, refusal)."""
        cat, act = self.rng.choice(self.acts)
        return cat, act, harmful_prompt(self.rng.choice(self.frames), act), _refusal(self.rng, REASONS[cat])

    def benign(self) -> tuple[str, str]:
        _, question, answer = self.rng.choice(self.pairs)
        return question, answer


def training_safety_conversations(count: int, seed: int = 0) -> list[dict]:
    """{"messages": [...]} rows, half a harmful request refused, half a benign look-alike answered; a
    fifth have two turns, the harmful one first or second (refusing depends on the request, not its place)."""
    rng = random.Random(f"synthetic-safety/sft/{seed}")
    draw = _Draw(rng)
    rows = []
    for _ in range(count):
        if rng.random() < MULTITURN_FRACTION:
            turns = [draw.harmful()[2:], draw.benign()]
            if rng.random() < 0.5:
                turns.reverse()
        else:
            turns = [draw.harmful()[2:] if rng.random() < 0.5 else draw.benign()]
        rows.append({"messages": turn_messages(turns)})
    return rows


def training_safety_preferences(count: int, seed: int = 0) -> list[dict]:
    """prompt/chosen/rejected rows: a harmful request prefers a refusal to an agreeable reply, a benign
    look-alike its answer to a refusal; a fifth follow an answered benign turn."""
    rng = random.Random(f"synthetic-safety/dpo/{seed}")
    draw = _Draw(rng)
    rows = []
    for _ in range(count):
        history = [draw.benign()] if rng.random() < MULTITURN_FRACTION else []
        if rng.random() < 0.5:
            _, act, asked, refusal = draw.harmful()
            chosen, rejected = refusal, _compliant(rng, act)
        else:
            asked, chosen = draw.benign()
            rejected = _refusal(rng, rng.choice(OVERCAUTIOUS))
        rows.append({"prompt": turn_messages(history) + [{"role": "user", "content": asked}],
                     "chosen": chosen, "rejected": rejected})
    return rows


def heldout_safety_rows() -> list[dict]:
    """Evaluation rows in ../shared/data/safety's format: every held-out act in HELDOUT_FRAMES_PER_ACT
    held-out frames (label harmful) and every held-out benign request (label benign). No seed."""
    own = frames(True)
    rows = [{"prompt": harmful_prompt(own[(i + j) % len(own)], a), "label": "harmful", "category": cat}
            for i, (cat, a) in enumerate(harmful_acts(True)) for j in range(HELDOUT_FRAMES_PER_ACT)]
    rows += [{"prompt": q, "label": "benign", "category": kind} for kind, q, _ in benign_items(True)]
    return [{"id": f"behemoth-safety-{i}", **row, "source": SOURCE} for i, row in enumerate(rows, 1)]


def write_safety_eval(out: Path) -> Path:
    """Write heldout_safety_rows() to `out` as JSONL, atomically; returns `out`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return write_jsonl(out, heldout_safety_rows())
