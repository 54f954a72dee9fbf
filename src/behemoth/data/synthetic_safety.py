"""Safety conversations the project writes itself: harmful requests answered with a refusal, and
benign look-alikes answered plainly, for SFT and DPO, plus held-out prompts for evaluation.

A small model learns mostly which words go with refusing. So every hazard's acts (hack into, make a
bomb, ...) come with a refusal in many request frames ("How can I {act}?"), and the same trigger words
in harmless senses (kill a process, a villain in my novel) with a helpful answer: it should refuse the
act, not the word. Most benign turns (COMPOSED_SHARE) are composed (`Family`): a frame filled from
lists, so the trigger words, frames and subjects vary independently ("How can I kill the weeds on my
driveway?", "Why can't nurses stop time?", "What is Yoda's bank account number?").

As in synthetic_chat, a hash of its text holds out a fifth (at least one) of each category's acts and
benign requests, of the frames and of each part's entries: `heldout_safety_rows` asks held-out acts in
held-out frames, held-out requests, and held-out entries composed in held-out frames, never trained on
in any wording. The public sets in ../shared/data/safety are for
evaluation only: every sentence here is our own (the tests check that no training prompt holds one).
"""

from __future__ import annotations

import hashlib
import itertools
import math
import random
import re
import tomllib
from dataclasses import dataclass
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
HARMFUL_SHARE = 0.25  # of single-turn rows and DPO pairs; the rest are benign look-alikes
COMPOSED_SHARE = 0.6  # of the benign turns: drawn from a composed family


@dataclass(frozen=True)
class Family:
    """Benign requests composed from a frame list and parts (see [[composed]] in the templates)."""
    kind: str
    frames: str  # a [frame_lists] name
    parts: dict[str, list[str]]  # [parts] name -> the fields its entries fill
    answers: tuple[str, ...]

    def fill(self, frame: str, entries: list[list[str]]) -> tuple[str, dict[str, str]]:
        """(request, fields) for one entry of each part; fields also hold capitalized forms."""
        fields = {f: v for names, entry in zip(self.parts.values(), entries) for f, v in zip(names, entry)}
        fields |= {f[:1].upper() + f[1:]: v[:1].upper() + v[1:] for f, v in fields.items()}
        return frame.format(**fields), fields

    def choices(self, heldout: bool) -> tuple[list[str], list[list[list[str]]]]:
        """The training or evaluation half of this family's frames and of each part's entries."""
        held = _heldout()
        entries = [[e for e in PARTS[name] if (e[0] in held) == heldout] for name in self.parts]
        return [f for f in FRAME_LISTS[self.frames] if (f in held) == heldout], entries


FRAME_LISTS: dict[str, tuple[str, ...]] = {name: tuple(fs) for name, fs in _TEXT["frame_lists"].items()}
PARTS: dict[str, list[list[str]]] = {name: [e if isinstance(e, list) else [e] for e in entries]
                                     for name, entries in _TEXT["parts"].items()}
FAMILIES: tuple[Family, ...] = tuple(
    Family(f["kind"], f["frames"], f["parts"], tuple(f["answers"]))
    for f in _TEXT["composed"])


def _heldout_of(items: tuple[str, ...], salt: str) -> frozenset[str]:
    """The fifth of `items` (at least one) whose hashes sort first: held out by content, not position."""
    ranked = sorted(items, key=lambda s: hashlib.sha256(f"synthetic-safety:{salt}:{s}".encode()).digest())
    return frozenset(ranked[:max(1, math.ceil(len(items) * HELDOUT_FRACTION))])


@cache
def _heldout() -> frozenset[str]:
    sets = [_heldout_of(fs, "frame") for fs in (FRAMES, *FRAME_LISTS.values())]  # one frame, one hash
    sets += [_heldout_of(tuple(e[0] for e in entries), f"part:{name}") for name, entries in PARTS.items()]
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


def training_user_prompts(label: str | None = None) -> list[str]:
    """Every user prompt training rows can contain (for leak checks against evaluation sets), or only
    the harmful or benign ones."""
    prompts = {"harmful": [harmful_prompt(f, a) for f in frames(False) for _, a in harmful_acts(False)],
               "benign": [q for _, q, _ in benign_items(False)]}
    for family in FAMILIES:
        frame_half, entry_halves = family.choices(heldout=False)
        prompts["benign"] += [family.fill(f, list(e))[0] for f in frame_half
                                  for e in itertools.product(*entry_halves)]
    return prompts[label] if label else prompts["harmful"] + prompts["benign"]


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
        self.families = [(f, f.choices(heldout=False)) for f in FAMILIES]

    def harmful(self) -> tuple[str, str, str]:
        """(prompt, refusal, agreeable reply): the last is DPO's rejected side."""
        cat, act = self.rng.choice(self.acts)
        return (harmful_prompt(self.rng.choice(self.frames), act), _refusal(self.rng, REASONS[cat]),
                _compliant(self.rng, act))

    def benign(self) -> tuple[str, str]:
        if self.rng.random() < COMPOSED_SHARE:
            family, (frame_half, entry_halves) = self.rng.choice(self.families)
            request, fields = family.fill(self.rng.choice(frame_half), [self.rng.choice(e) for e in entry_halves])
            return request, self.rng.choice(family.answers).format(**fields)
        _, question, answer = self.rng.choice(self.pairs)
        return question, answer


def training_safety_conversations(count: int, seed: int = 0) -> list[dict]:
    """{"messages": [...]} rows: a HARMFUL_SHARE of harmful requests refused, the rest benign look-alikes
    answered; a fifth have two turns, the harmful one first or second (refusing depends on the request,
    not its place)."""
    rng = random.Random(f"synthetic-safety/sft/{seed}")
    draw = _Draw(rng)
    rows = []
    for _ in range(count):
        if rng.random() < MULTITURN_FRACTION:
            turns = [draw.harmful()[:2], draw.benign()]
            if rng.random() < 0.5:
                turns.reverse()
        else:
            turns = [draw.harmful()[:2] if rng.random() < HARMFUL_SHARE else draw.benign()]
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
        if rng.random() < HARMFUL_SHARE:
            asked, chosen, rejected = draw.harmful()
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
    for family in FAMILIES:  # each held-out entry of the first part, with the others' and frames in turn
        frame_half, (first, *others) = family.choices(heldout=True)
        prompts = [family.fill(frame_half[(i + j) % len(frame_half)],
                               [entry] + [e[(i + j) % len(e)] for e in others])[0]
                   for i, entry in enumerate(first) for j in range(HELDOUT_FRAMES_PER_ACT)]
        rows += [{"prompt": q, "label": "benign", "category": family.kind} for q in dict.fromkeys(prompts)]
    return [{"id": f"behemoth-safety-{i}", **row, "source": SOURCE} for i, row in enumerate(rows, 1)]


def write_safety_eval(out: Path) -> Path:
    """Write heldout_safety_rows() to `out` as JSONL, atomically; returns `out`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return write_jsonl(out, heldout_safety_rows())
