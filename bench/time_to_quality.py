"""Time to quality of the speedrun's pretraining recipe: held-out bits/byte against training time, per
recipe arm and seed, and the time each arm needs to reach the baseline recipe's final bits/byte.

    .venv/bin/python bench/time_to_quality.py [--stage teacher|student] [--arms baseline bf16 muon ...]
                                             [--seeds 0 1 2 3 4] [--minutes 10] [--steps N] [--workdir DIR]
                                             [--reuse] [--no-write]

Every run is a speedrun stage as `behemoth speedrun --minutes M` runs it, with the arm's settings on
top and a validation every 1/20 of the run: the teacher (cpu-small pretrained on the embedded
corpus) or the student (cpu-mini distilled from one teacher of today's default recipe, trained once
in the workdir with seed 0 and shared by every student run). Training time is the sum of the steps' own times
(tokens / tokens_per_s from metrics.jsonl), so evaluations do not count. Per arm: the mean final
held-out bits/byte over seeds, and the time each seed first reaches the target (the baseline
arm's mean final bits/byte; linear between evaluations). Significance across seeds, never repeats
of one seed: a one-sided Welch t-test that the arm's final bits/byte is below the baseline's, and
that its time to the target is below the baseline's full training time (the modded-nanogpt rule:
a record needs p < 0.01). Curves go to time_to_quality.png (the student's to
time_to_quality_student.png). Runs one after another, the arms interleaved seed by seed: nothing
else should use the cores meanwhile.
"""

from __future__ import annotations

import argparse
import math
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import write_section  # noqa: E402

from behemoth.data.embedded import embedded_corpus  # noqa: E402
from behemoth.speedrun import plan_steps, stage_config  # noqa: E402
from behemoth.train.distill import distill  # noqa: E402
from behemoth.train.metrics import read_metrics  # noqa: E402
from behemoth.train.trainer import pretrain  # noqa: E402

SECTIONS = {"teacher": "Time to quality: the speedrun teacher's recipe",
            "student": "Time to quality: the speedrun student's recipe (distillation)"}
# Every arm names its optimizer, precision and schedule: the stages' own defaults (train/config.py
# STAGE_DEFAULTS) are what this study decides, so no arm may inherit them.
COSINE = "optim.schedule='cosine'"
ARMS = {
    "baseline": ["run.dtype='float32'", "optim.name='adamw'", COSINE],  # the recipe before this study
    "bf16": ["run.dtype='bfloat16'", "optim.name='adamw'", COSINE],
    "muon": ["run.dtype='bfloat16'", "optim.name='muon'", COSINE],
    "muon-wsd": ["run.dtype='bfloat16'", "optim.name='muon'", "optim.schedule='wsd'"],  # pretrain's default
    "bf16-lr2x": ["run.dtype='bfloat16'", "optim.name='adamw'", "optim.lr=6e-3", COSINE],
    "muon-lr2x": ["run.dtype='bfloat16'", "optim.name='muon'", "optim.muon_lr=0.04", COSINE],
    "muon-wsd-zero": ["run.dtype='bfloat16'", "optim.name='muon'", "optim.schedule='wsd'",
                      "run.zero_init_outputs=true"],
}


def run_arm(arm: str, seed: int, steps: int, corpus: Path, workdir: Path, reuse: bool = False,
            teacher: Path | None = None) -> list[tuple[float, float]]:
    """(training seconds, held-out bits/byte) at every evaluation of one run: a teacher, or with
    `teacher` a student distilled from it. With `reuse`, a run of the same arm, seed and steps that
    finished in `workdir` before is read, not repeated."""
    out = workdir / f"{'student-' if teacher else ''}{arm}-seed{seed}-{steps}steps"
    finished = (out / "model").is_dir() and (out / "metrics.jsonl").is_file()
    if not (reuse and finished):
        if out.exists():
            shutil.rmtree(out)
        settings = [*ARMS[arm], f"run.eval_every={max(1, steps // 20)}", f"run.checkpoint_every={steps}",
                    "run.keep_checkpoints=1"]
        if teacher is None:
            pretrain(stage_config("teacher", steps, seed, settings, [corpus]), out, progress=False)
        else:
            distill(stage_config("student", steps, seed, settings, [corpus]), teacher, out, progress=False)
    seconds, seen, curve = 0.0, 0, []
    for record in read_metrics(out / "metrics.jsonl"):
        if "tokens_per_s" in record:  # a step: its tokens over its own speed
            seconds += (record["tokens_seen"] - seen) / record["tokens_per_s"]
            seen = record["tokens_seen"]
        if "val_bpb" in record:
            curve.append((seconds, record["val_bpb"]))
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return curve


def time_to(curve: list[tuple[float, float]], target: float) -> float | None:
    """The first time the curve reaches `target`, linear between evaluations; None if it never does."""
    if curve and curve[0][1] <= target:
        return curve[0][0]
    for (t0, b0), (t1, b1) in zip(curve, curve[1:]):
        if b1 <= target:  # b0 > target here
            return t0 + (t1 - t0) * (b0 - target) / (b0 - b1)
    return None


def one_sided_below(sample: list[float], reference: list[float]) -> float:
    """p-value of 'mean(sample) < mean(reference)', Welch's t-test."""
    from scipy import stats

    return float(stats.ttest_ind(sample, reference, equal_var=False, alternative="less").pvalue)


def paired_below(sample: list[float], reference: list[float]) -> tuple[float, float]:
    """Mean of sample - reference (the same seeds, in order) and the p-value of 'it is below 0', a
    paired t-test: one seed fixes an arm's initialisation and batches, so seeds pair across arms."""
    from scipy import stats

    differences = [a - b for a, b in zip(sample, reference)]
    return statistics.mean(differences), float(stats.ttest_rel(sample, reference, alternative="less").pvalue)


def plot(curves: dict[str, list[list[tuple[float, float]]]], target: float, path: Path, stage: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=110)
    for index, (arm, runs) in enumerate(curves.items()):
        for number, curve in enumerate(runs):
            ax.plot([t / 60 for t, _ in curve], [b for _, b in curve], "-", color=f"C{index}", alpha=0.7,
                    label=arm if number == 0 else None, linewidth=1)
    ax.axhline(target, color="black", linestyle=":", linewidth=1, label="target (baseline's final)")
    ax.set_xlabel("training time (minutes, evaluations excluded)")
    ax.set_ylabel("held-out bits per byte")
    ax.set_ylim(top=min(ax.get_ylim()[1], target + 0.6))
    ax.set_title(f"Speedrun {stage}: time to quality, every seed")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=list(SECTIONS), default="teacher")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--minutes", type=float, default=10.0, help="the speedrun budget whose teacher is run")
    parser.add_argument("--steps", type=int,
                        help="steps per run instead of the stage's share of --minutes (to add arms to a study "
                             "made before the shares moved)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/behemoth-time-to-quality"))
    parser.add_argument("--reuse", action="store_true",
                        help="read runs that finished in --workdir before instead of repeating them (adding seeds)")
    parser.add_argument("--paired-with", default="muon", choices=list(ARMS),
                        help="the arm every other arm's final bits/byte is compared with, seed by seed (default muon)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    arms = ["baseline", *[a for a in args.arms if a != "baseline"]]
    steps = args.steps or plan_steps(args.minutes)[args.stage]
    corpus = embedded_corpus(args.workdir / "corpus")
    teacher = default_teacher(args.minutes, corpus, args.workdir) if args.stage == "student" else None
    curves = {arm: [] for arm in arms}
    for seed in args.seeds:  # arms interleaved, so a slow spell of the machine hits them alike
        for arm in arms:
            curve = run_arm(arm, seed, steps, corpus, args.workdir, args.reuse, teacher)
            curves[arm].append(curve)
            print(f"{arm} seed {seed}: final {curve[-1][1]:.4f} bits/byte after {curve[-1][0]:.0f} s", flush=True)

    final = {arm: [runs[-1][1] for runs in curves[arm]] for arm in arms}
    target = statistics.mean(final["baseline"])
    baseline_time = statistics.mean(curve[-1][0] for curve in curves["baseline"])
    rows = []
    for arm in arms:
        times = [time_to(curve, target) for curve in curves[arm]]
        reached = [t for t in times if t is not None]
        mean_time = statistics.mean(reached) if reached else math.nan
        p_final = one_sided_below(final[arm], final["baseline"]) if arm != "baseline" and len(args.seeds) > 1 else None
        p_time = (one_sided_below(reached, [curve[-1][0] for curve in curves["baseline"]])
                  if arm != "baseline" and len(reached) == len(times) > 1 else None)
        spread = statistics.stdev(final[arm]) if len(final[arm]) > 1 else 0.0
        against_muon = "-"
        if arm not in ("baseline", args.paired_with) and args.paired_with in final and len(args.seeds) > 1:
            difference, p = paired_below(final[arm], final[args.paired_with])
            against_muon = f"{difference:+.4f} (p {p:.2g})"
        rows.append(f"| {arm} | {' '.join(ARMS[arm])} | {statistics.mean(final[arm]):.4f} ± {spread:.4f} | "
                    f"{len(reached)}/{len(times)} | {mean_time / baseline_time:.2f}x | "
                    f"{'-' if p_final is None else f'{p_final:.3g}'} | {'-' if p_time is None else f'{p_time:.3g}'} | "
                    f"{against_muon} |")
    png = Path(__file__).parent / f"time_to_quality{'' if args.stage == 'teacher' else '_' + args.stage}.png"
    plot(curves, target, png, args.stage)
    what = {"teacher": f"the speedrun teacher ({steps} steps of cpu-small on the embedded corpus)",
            "student": f"the speedrun student ({steps} steps of cpu-mini distilled from one teacher of the "
                       "default recipe, seed 0)"}[args.stage]
    body = "\n".join([
        f"`bench/time_to_quality.py --stage {args.stage} --arms {' '.join(arms)} "
        f"--seeds {' '.join(map(str, args.seeds))} --minutes {args.minutes:g}"
        f"{f' --steps {args.steps}' if args.steps else ''}"
        f"{f' --paired-with {args.paired_with}' if args.paired_with != 'muon' else ''}`: {what}, "
        f"{len(args.seeds)} seeds per arm, one run after another. Target: the baseline's mean final held-out "
        f"bits/byte, {target:.4f}. Time: training steps only, as a multiple of the baseline's "
        f"{baseline_time:.0f} s. p: one-sided Welch t-tests across seeds (final bits/byte below the "
        "baseline's; time to the target below the baseline's time), and a paired t-test of an arm's final "
        f"bits/byte against the {args.paired_with} arm's at the same seeds; a record needs p < 0.01.", "",
        "| arm | settings | final bits/byte (mean ± sd) | seeds reaching the target | time to target | p (final) | "
        f"p (time) | final vs {args.paired_with}, same seeds (paired p) |",
        "|---|---|---|---|---|---|---|---|", *rows, "",
        f"![time to quality]({png.name})"])
    print(body)
    if not args.no_write:
        write_section(SECTIONS[args.stage], body)


def default_teacher(minutes: float, corpus: Path, workdir: Path) -> Path:
    """The teacher every student run distils from: the speedrun's teacher stage, default recipe, seed 0."""
    out = workdir / f"teacher-default-{minutes:g}min"
    if not (out / "model").is_dir():
        pretrain(stage_config("teacher", plan_steps(minutes)["teacher"], 0, [], [corpus]), out, progress=False)
    return out / "model"


if __name__ == "__main__":
    main()
