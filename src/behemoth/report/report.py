"""The report card of a run: report.md with the loss curve, expert load and samples."""

from __future__ import annotations

import datetime
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from behemoth.info import human


def plot_losses(records: Sequence[dict[str, Any]], out: Path, title: str = "") -> Path:
    """Training loss per step (and validation loss where measured) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(steps, [r["loss"] for r in records], label="train loss", linewidth=1)
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def plot_expert_load(records: Sequence[dict[str, Any]], out: Path) -> Path | None:
    """Max/min expert share per MoE layer over training: how balanced routing is."""
    loads = [r.get("expert_load") for r in records]
    if not loads or not loads[0]:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=110)
    for layer in range(len(loads[0])):
        imbalance = [max(load[layer]) * len(load[layer]) for load in loads]
        ax.plot(steps, imbalance, label=f"MoE layer {layer}", linewidth=1)
    ax.axhline(1.0, color="gray", linestyle="--", linewidth=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("busiest expert / fair share")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def write_report(out_dir: Path, title: str, summary: dict[str, Any], records: Sequence[dict[str, Any]],
                 samples: Sequence[tuple[str, str]]) -> Path:
    """report.md (+ PNG plots) in out_dir; summary is a flat dict of facts shown as a table."""
    loss_png = plot_losses(records, out_dir / "loss.png", title) if records else None
    load_png = plot_expert_load(records, out_dir / "expert_load.png") if records else None
    lines = [f"# {title}", "",
             f"{datetime.datetime.now().isoformat(timespec='seconds')} on {platform.node() or 'this machine'} "
             f"({platform.processor() or platform.machine()}, torch {torch.__version__})", "",
             "| | |", "|---|---|"]
    for key, value in summary.items():
        shown = human(value) if isinstance(value, int) and value >= 10_000 else (
            f"{value:.4f}" if isinstance(value, float) else value)
        lines.append(f"| {key} | {shown} |")
    if loss_png:
        lines += ["", "## Loss", "", f"![loss]({loss_png.name})"]
    if load_png:
        lines += ["", "## Expert load", "", f"![expert load]({load_png.name})"]
    if samples:
        lines += ["", "## Samples", ""]
        for prompt, text in samples:
            lines += [f"**{prompt}**", "", "> " + text.replace("\n", "\n> "), ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines).rstrip() + "\n")
    return path
