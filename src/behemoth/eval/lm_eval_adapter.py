"""The `behemoth` model type for EleutherAI's lm-evaluation-harness (`pip install 'behemoth[lm-eval]'`).

Importing this module registers the type with the harness's Python API (`lm_eval.simple_evaluate(model=
"behemoth", model_args="pretrained=DIR", tasks=[...])`). The harness reads no plugin entry points, so
`behemoth eval lm-eval ARGS` or `python -m behemoth.eval.lm_eval_adapter ARGS` run its command line with it.
model_args: pretrained=DIR (required), batch_size, max_length, device, dtype (float32 / bfloat16),
max_gen_toks (default 256), seed (sampling seed, default 0). Scoring is behemoth.eval.scoring's.

Without a network the harness's datasets library would retry the hub for about 40 seconds, then fail
with a long traceback. So unless HF_HUB_OFFLINE, HF_DATASETS_OFFLINE or TRANSFORMERS_OFFLINE says how
to run, the command line first asks the hub (one HEAD request) and goes offline when it does not answer:
cached datasets and local files still load, and a dataset that would have to be fetched is one line.
"""

from __future__ import annotations

import logging
import os
import ssl
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lm_eval.models  # noqa: F401  (the harness's own types first: it fills an empty registry only)
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from behemoth.eval.errors import EvalError
from behemoth.eval.run import _torch_dtype, load_model_tokenizer
from behemoth.eval.scoring import Scorer

GENERATION_CHUNK = 16  # new tokens between checks for a stop string
HUB = "https://huggingface.co"
HUB_PROBE_SECONDS = 5.0
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


@register_model("behemoth")
class BehemothLM(LM):
    """A behemoth model directory (Hugging Face layout, with its tokenizer) as an lm-eval LM."""

    def __init__(self, pretrained: str, batch_size: int | str | None = 16, max_length: int | None = None,
                 device: str | None = None, dtype: str | None = None, max_gen_toks: int = 256, seed: int = 0,
                 max_batch_size: int | None = None):
        super().__init__()
        from behemoth.checkpoint import load

        directory = Path(str(pretrained))
        tokenizer = load_model_tokenizer(directory)
        model = load(directory, device=_device(device), dtype=_torch_dtype(dtype)).eval()
        self.scorer = Scorer(model, tokenizer, batch_size=_batch_size(batch_size, max_batch_size),
                             max_length=int(max_length) if max_length else None)
        self.max_gen_toks = int(max_gen_toks)
        self.seed = int(seed)

    @property
    def tokenizer_name(self) -> str:
        return f"behemoth-{self.scorer.tokenizer.sha256[:16]}"

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        scores = self.scorer.loglikelihoods([tuple(request.args[:2]) for request in requests])
        return [(score.logprob, score.greedy) for score in scores]

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        return [logprob for logprob, _ in self.scorer.rolling([request.args[0] for request in requests])]

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        return [self._generate(number, *request.args[:2]) for number, request in enumerate(requests)]

    def _generate(self, number: int, context: str, gen_kwargs: dict[str, Any] | None) -> str:
        kwargs = dict(gen_kwargs or {})
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
        sample = bool(kwargs.pop("do_sample", False))
        temperature = float(kwargs.pop("temperature", 0.0) or 0.0) if sample else 0.0
        top_k = kwargs.pop("top_k", None)
        prompt = [self.scorer.prefix_id, *self.scorer.tokenizer.encode(context)]
        new: list[int] = []
        while len(new) < max_new:
            step = min(GENERATION_CHUNK, max_new - len(new))
            piece = self.scorer.generate_tokens(prompt + new, max_new_tokens=step, temperature=temperature,
                                                top_k=int(top_k) if top_k else None,
                                                seed=self.seed + number + len(new))
            new.extend(piece)
            text = self.scorer.tokenizer.decode(new)
            cuts = [text.find(stop) for stop in until if stop and stop in text]
            if cuts:
                return text[:min(cuts)]
            if len(piece) < step:
                break  # the model ended the text
        return self.scorer.tokenizer.decode(new)


def _device(requested: str | None) -> str:
    """The harness's command line asks for cuda by default; like its own HF model, use the CPU then."""
    import torch

    if requested and not (requested.startswith("cuda") and not torch.cuda.is_available()):
        return requested
    if requested:
        logging.getLogger(__name__).warning("device %s is not available; using the CPU", requested)
    return "cuda" if torch.cuda.is_available() else "cpu"


def _batch_size(value: int | str | None, max_batch_size: int | None) -> int:
    """lm-eval passes an int, a numeric string or "auto[:N]"; auto becomes 16 (or max_batch_size)."""
    if value is None or str(value).startswith("auto"):
        return int(max_batch_size or 16)
    try:
        return max(1, int(value))
    except ValueError:
        raise EvalError(f"batch_size must be an integer or 'auto', got {value!r}") from None


def main(argv: list[str] | None = None) -> int:
    """The lm-eval command line with the `behemoth` type registered (offline when the hub cannot be
    reached); a dataset that could not be fetched is an EvalError naming its task."""
    from huggingface_hub.utils import LocalEntryNotFoundError
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *(sys.argv[1:] if argv is None else argv)]
    with _offline_unless_hub_answers() as offline_because:
        try:
            cli_evaluate()
        except BrokenPipeError:  # a ConnectionError too, but our output's: the caller's to handle
            raise
        except (ConnectionError, LocalEntryNotFoundError) as err:
            problem = _not_fetched(err, offline_because)
            if problem is None:
                raise
            raise problem from None
    return 0


@contextmanager
def _offline_unless_hub_answers() -> Iterator[str | None]:
    """Offline for the duration when the environment leaves it open and the hub does not answer;
    yields why the run is offline (None when it is not)."""
    before = {name: os.environ.get(name) for name in OFFLINE_VARIABLES}
    reason = None
    if any(_true(value) for value in before.values()):
        reason = f"offline mode is set ({', '.join(n for n, v in before.items() if _true(v))})"
    elif not any(value is not None for value in before.values()):
        endpoint = os.environ.get("HF_ENDPOINT", HUB).rstrip("/")
        if not _answers(endpoint):
            reason = f"{endpoint} cannot be reached (no network?)"
            os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
    _apply_offline_variables()
    try:
        yield reason
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        _apply_offline_variables()


def _true(value: str | None) -> bool:
    return (value or "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _answers(url: str) -> bool:
    """Whether anything answers at `url`: one request, no retries. A refused certificate counts as
    an answer: the hub's own client, which may trust other certificates, decides then."""
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=HUB_PROBE_SECONDS).close()
    except urllib.error.HTTPError:
        return True
    except urllib.error.URLError as err:
        return isinstance(err.reason, ssl.SSLError)
    except (OSError, ValueError):
        return False
    return True


def _apply_offline_variables() -> None:
    """huggingface_hub and datasets read the offline variables once, when imported: make those
    already imported (in this process, by an earlier run) see them as they are now."""
    hub = _true(os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE"))
    datasets_value = os.environ.get("HF_DATASETS_OFFLINE")
    datasets_offline = hub if datasets_value is None else _true(datasets_value)
    if (constants := sys.modules.get("huggingface_hub.constants")) is not None:
        constants.HF_HUB_OFFLINE = hub
    if (config := sys.modules.get("datasets.config")) is not None:
        config.HF_HUB_OFFLINE = config.HF_DATASETS_OFFLINE = datasets_offline


def _not_fetched(err: Exception, offline_because: str | None) -> EvalError | None:
    """One line for a dataset (or hub file) that could not be fetched, naming the task whose loading
    raised `err`; None for any other connection error."""
    from huggingface_hub.utils import LocalEntryNotFoundError, OfflineModeIsEnabled
    from lm_eval.api.task import Task

    task, tb = None, err.__traceback__
    while tb is not None:  # the innermost task on the way from the harness to the error
        candidate = tb.tb_frame.f_locals.get("self")
        if isinstance(candidate, Task):
            task = candidate
        tb = tb.tb_next
    why = offline_because or f"{type(err).__name__}: {err}"
    remedy = "connect, or point HF_HOME (or HF_DATASETS_CACHE) at a cache that holds it"
    if task is None:
        if isinstance(err, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
            return EvalError(f"lm-eval: a file could not be fetched from the Hugging Face hub: {why}; {remedy}")
        return None
    config = getattr(task, "config", None)
    name = getattr(config, "task", None) or type(task).__name__
    path = getattr(config, "dataset_path", None) or getattr(task, "DATASET_PATH", None)
    dataset = f"the dataset of task {name!r}" + (f" ({path})" if path else "")
    return EvalError(f"lm-eval: {dataset} could not be fetched and is not in the local cache: {why}; {remedy}")


if __name__ == "__main__":
    sys.exit(main())
