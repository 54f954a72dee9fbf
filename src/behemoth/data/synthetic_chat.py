"""Chat tasks the project generates itself, with checkable answers: SFT, DPO and RL data, and held-out
evaluation prompts, of four kinds a small model learns in minutes (add two numbers under 20, the
number after one under 1000, repeat a word 2 to 5 times, spell a word backwards).

A problem ("add 3 9", whatever the wording) is held out or not by a hash of it, once and for all:
training data never holds an evaluation problem (tested over every problem), so evaluation measures
the task, not recall. "reworded" questions use wordings training never does; "multiturn" ones come
as a chat's second or third turn.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from behemoth.errors import ConfigError
from behemoth.hashing import unit_hash
from behemoth.jsonio import write_jsonl

KINDS = ("add", "next", "repeat", "reverse")
STYLES = ("plain", "reworded", "multiturn")
HELDOUT_FRACTION = 0.2
SAFETY_SHARE = 0.25  # of SFT conversations and DPO pairs: see write_chat_data
ADD_BELOW, NEXT_BELOW, TIMES = 20, 1000, (2, 3, 4, 5)
WORDS = (
    "apple", "bread", "bridge", "candle", "castle", "cloud", "coin", "corn", "crown", "desert",
    "door", "dream", "eagle", "earth", "field", "fire", "fish", "flower", "forest", "garden",
    "gate", "gold", "grape", "grass", "hand", "harp", "heart", "hill", "honey", "horse",
    "house", "iron", "island", "king", "lamb", "lamp", "leaf", "light", "lion", "moon",
    "mountain", "night", "oil", "olive", "paper", "path", "pearl", "rain", "river", "road",
    "rock", "root", "rose", "salt", "sand", "sea", "seed", "sheep", "ship", "silver",
    "sky", "snow", "song", "star", "stone", "storm", "sun", "sword", "table", "temple",
    "tent", "tower", "tree", "valley", "voice", "wall", "water", "wheat", "wind", "window",
    "wine", "wing", "winter", "wolf", "wood", "word", "world", "year", "yellow", "zebra",
)

# Each kind's operands, by the names the question and reply wordings use.
OPERANDS = {"add": ("a", "b"), "next": ("n",), "repeat": ("word", "times"), "reverse": ("word",)}
QUESTIONS = {
    "add": ("What is {a} plus {b}?", "What is {a} + {b}?", "Add {a} and {b}.", "How much is {a} plus {b}?",
            "Compute {a} + {b}.", "What do you get when you add {a} and {b}?", "{a} + {b} = ?"),
    "next": ("Which number comes after {n}?", "What number follows {n}?", "What comes after {n}?",
             "Count one up from {n}.", "What is the next number after {n}?", "Give the number after {n}."),
    "repeat": ("Say the word {word} {times} times.", "Repeat {word} {times} times.",
               "Write {word} {times} times.", "Say {word} {times} times, please.",
               "Can you repeat the word {word} {times} times?"),
    "reverse": ("Spell {word} backwards.", "Write {word} backwards.", "Reverse the letters of {word}.",
                "How is {word} spelled backwards?"),
}
REWORDED = {  # never used in training
    "add": ("What's the sum of {a} and {b}?", "Please add {b} to {a}.", "Tell me {a} plus {b}."),
    "next": ("Which number is one more than {n}?", "Tell me the number that follows {n}.",
             "If you count up from {n}, what comes next?"),
    "repeat": ("Please write the word {word} {times} times.", "I need {word} {times} times.",
               "Give me {word} repeated {times} times."),
    "reverse": ("What is {word} spelled backwards?", "Tell me {word} written backwards.",
                "Spell the word {word} in reverse."),
}
# Reply wordings; the answer always comes last, where the "number" check looks for it.
REPLIES = {
    "add": ("{a} plus {b} is {answer}.", "{answer}", "The answer is {answer}.", "{a} + {b} = {answer}."),
    "next": ("The number after {n} is {answer}.", "{answer}", "The next number is {answer}."),
    "repeat": ("{answer}", "{answer}."),
    "reverse": ("{word} backwards is {answer}.", "{answer}"),
}
MATCH = {"add": "number", "next": "number", "repeat": "exact", "reverse": "contains"}


@dataclass(frozen=True)
class Problem:
    """One question with one correct answer, independent of its wording."""

    kind: str
    operands: tuple

    @property
    def key(self) -> str:
        return " ".join(map(str, (self.kind, *self.operands)))

    @property
    def answer(self) -> str:
        if self.kind == "add":
            return str(self.operands[0] + self.operands[1])
        if self.kind == "next":
            return str(self.operands[0] + 1)
        word = self.operands[0]
        return " ".join([word] * self.operands[1]) if self.kind == "repeat" else word[::-1]

    @property
    def wrong_answer(self) -> str:
        """A plausible mistake: off by one, one word too many, the word unreversed."""
        if self.kind in ("add", "next"):
            return str(int(self.answer) + (-1 if self.kind == "next" else 1))
        word = self.operands[0]
        return " ".join([word] * (self.operands[1] + 1)) if self.kind == "repeat" else word

    @property
    def match(self) -> str:
        return MATCH[self.kind]

    def fields(self) -> dict:
        return dict(zip(OPERANDS[self.kind], self.operands))


def is_heldout(problem: Problem) -> bool:
    """Whether the problem belongs to the evaluation half (by a hash of its content, never its position)."""
    return unit_hash(f"synthetic-chat:{problem.key}") < HELDOUT_FRACTION


def all_problems(kind: str) -> list[Problem]:
    """Every problem of a kind, in a fixed order."""
    if kind == "add":
        return [Problem(kind, (a, b)) for a in range(1, ADD_BELOW) for b in range(1, ADD_BELOW)]
    if kind == "next":
        return [Problem(kind, (n,)) for n in range(NEXT_BELOW)]
    if kind == "repeat":
        return [Problem(kind, (word, times)) for word in WORDS for times in TIMES]
    if kind == "reverse":
        return [Problem(kind, (word,)) for word in WORDS]
    raise ValueError(f"unknown synthetic task kind {kind!r} (known: {', '.join(KINDS)})")


def problems(kind: str, heldout: bool) -> list[Problem]:
    """The training (heldout=False) or evaluation half of a kind's problems."""
    return [p for p in all_problems(kind) if is_heldout(p) == heldout]


def question(problem: Problem, rng: random.Random, reworded: bool = False) -> str:
    wordings = (REWORDED if reworded else QUESTIONS)[problem.kind]
    return rng.choice(wordings).format(**problem.fields())


def reply(problem: Problem, rng: random.Random) -> str:
    return rng.choice(REPLIES[problem.kind]).format(answer=problem.answer, **problem.fields())


def _turns(rng: random.Random, pool: dict[str, list[Problem]], count: int) -> list[tuple[Problem, str, str]]:
    """`count` (problem, question, correct reply) turns, each of a random kind."""
    turns = []
    for _ in range(count):
        problem = rng.choice(pool[rng.choice(KINDS)])
        turns.append((problem, question(problem, rng), reply(problem, rng)))
    return turns


def turn_messages(turns: list[tuple]) -> list[dict[str, str]]:
    """User and assistant messages of turns (..., question, reply)."""
    return [m for *_, q, r in turns
            for m in ({"role": "user", "content": q}, {"role": "assistant", "content": r})]


def training_conversations(count: int, seed: int = 0) -> list[list[dict[str, str]]]:
    """Conversations of one to three turns (half of them single-turn), from training problems only."""
    rng = random.Random(seed)
    pool = _pool(heldout=False)
    return [turn_messages(_turns(rng, pool, rng.choice((1, 1, 1, 2, 2, 3)))) for _ in range(count)]


def training_preferences(count: int, seed: int = 0) -> list[dict]:
    """prompt/chosen/rejected rows: the last turn's correct reply against the same reply with a
    plausible mistake, after zero to two earlier turns; training problems only."""
    rng = random.Random(seed + 1_000_003)  # not the conversations' stream
    pool = _pool(heldout=False)
    rows = []
    for _ in range(count):
        prompt, problem = _open_question(rng, pool)
        template = rng.choice(REPLIES[problem.kind])
        rows.append({"prompt": prompt, "chosen": template.format(answer=problem.answer, **problem.fields()),
                     "rejected": template.format(answer=problem.wrong_answer, **problem.fields())})
    return rows


def training_prompts(count: int, seed: int = 0) -> list[dict]:
    """RL rows {"prompt": messages, "answer", "match"} (as `behemoth rl` and `gen:FILE` read them): the
    last turn's question after zero to two answered turns; training problems only."""
    rng = random.Random(seed + 2_000_003)  # not the conversations' or preferences' stream
    pool = _pool(heldout=False)
    return [{"prompt": prompt, "answer": problem.answer, "match": problem.match}
            for prompt, problem in (_open_question(rng, pool) for _ in range(count))]


def _pool(heldout: bool) -> dict[str, list[Problem]]:
    return {kind: problems(kind, heldout) for kind in KINDS}


def _open_question(rng: random.Random, pool: dict[str, list[Problem]]) -> tuple[list[dict[str, str]], Problem]:
    """A conversation of zero to two answered turns and a question left open, and that question's problem."""
    *history, (problem, asked, _) = _turns(rng, pool, rng.choice((1, 1, 2, 3)))
    return turn_messages(history) + [{"role": "user", "content": asked}], problem


@dataclass(frozen=True)
class HeldoutItem:
    """An evaluation prompt: the chat so far (ending in the user's question), how to check the reply."""

    id: str
    messages: tuple[tuple[str, str], ...]  # (role, content)
    answer: str
    match: str


def heldout_items(kind: str, style: str = "plain", count: int = 50, seed: int = 0) -> list[HeldoutItem]:
    """`count` evaluation prompts of one kind: held-out problems (distinct while they last), asked
    in a training wording ("plain"), in a wording training never used ("reworded"), or as the
    last turn of a two- or three-turn chat whose earlier turns are answered ("multiturn")."""
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r} (known: {', '.join(STYLES)})")
    rng = random.Random(f"{kind}/{style}/{seed}")
    own = problems(kind, heldout=True)
    pool = _pool(heldout=True)
    order = rng.sample(own, len(own))
    items = []
    for i in range(count):
        problem = order[i % len(order)]
        history = _turns(rng, pool, rng.choice((1, 2))) if style == "multiturn" else []
        asked = question(problem, rng, style == "reworded")
        messages = turn_messages(history) + [{"role": "user", "content": asked}]
        items.append(HeldoutItem(f"{kind}-{style}-{i}", tuple((m["role"], m["content"]) for m in messages),
                                 problem.answer, problem.match))
    return items


@dataclass(frozen=True)
class ChatData:
    sft: Path  # conversations, messages form
    dpo: Path  # prompt / chosen / rejected
    rl: Path   # prompt / answer / match


def check_safety_share(share: float) -> None:
    """Refuse a safety share outside [0, 1] in one line, before anything is written."""
    if not 0 <= share <= 1:
        raise ConfigError(f"--safety-share must be between 0 and 1, got {share}")


def write_chat_data(out_dir: Path, conversations: int = 8000, pairs: int = 2000, prompts: int = 2000,
                    seed: int = 0, safety: float = SAFETY_SHARE) -> ChatData:
    """Write sft.jsonl, dpo.jsonl and rl.jsonl into out_dir, all from training problems; a `safety`
    share of the conversations and pairs are refusals of harmful requests and answers to benign
    look-alikes (behemoth.data.synthetic_safety), shuffled in."""
    from behemoth.data.synthetic_safety import training_safety_conversations, training_safety_preferences

    check_safety_share(safety)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = ChatData(out_dir / "sft.jsonl", out_dir / "dpo.jsonl", out_dir / "rl.jsonl")
    rng = random.Random(seed + 3_000_003)
    refusing = round(conversations * safety)
    sft = ([{"messages": m} for m in training_conversations(conversations - refusing, seed)]
           + training_safety_conversations(refusing, seed))
    write_jsonl(data.sft, rng.sample(sft, len(sft)))
    refusing = round(pairs * safety)
    dpo = training_preferences(pairs - refusing, seed) + training_safety_preferences(refusing, seed)
    write_jsonl(data.dpo, rng.sample(dpo, len(dpo)))
    write_jsonl(data.rl, training_prompts(prompts, seed))
    return data
