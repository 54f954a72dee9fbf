"""The report card of a run: report.md, and report.html with the plots inside it.

Markdown is the one source: the HTML file is rendered from it, with every PNG embedded, so it
can be mailed or archived as a single file.
"""

from __future__ import annotations

import base64
import datetime
import html
import platform
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_losses(records: Sequence[dict[str, Any]], out: Path, title: str = "") -> Path:
    """Training loss per step, and validation loss where it was measured, as a PNG."""
    return plot_series(records, {"train loss": "loss", "validation loss": "val_loss"}, out, title, "loss (nats/token)")


def plot_series(records: Sequence[dict[str, Any]], series: dict[str, str], out: Path, title: str = "",
                ylabel: str = "") -> Path | None:
    """Logged numbers per step, one line per `series` entry (legend label -> metrics key), as a PNG;
    None when no record holds any of them."""
    lines = {label: [(r["step"], r[key]) for r in records if key in r] for label, key in series.items()}
    lines = {label: points for label, points in lines.items() if points}
    if not lines:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for label, points in lines.items():
        ax.plot(*zip(*points), "o-" if len(points) < 20 else "-", label=label, linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def plot_expert_heatmap(records: Sequence[dict[str, Any]], out: Path, title: str = "") -> Path | None:
    """Per MoE layer, the share of tokens each expert received at each step (one heatmap row per layer)."""
    loads = [r["expert_load"] for r in records if r.get("expert_load")]
    if not loads:
        return None
    plt = _pyplot()
    layers, experts = len(loads[0]), len(loads[0][0])
    steps = [r["step"] for r in records if r.get("expert_load")]
    fig, axes = plt.subplots(layers, 1, figsize=(7, 1.0 + 1.1 * layers), dpi=110, sharex=True, squeeze=False)
    image = None
    for layer, ax in enumerate(axes[:, 0]):
        grid = [[step_loads[layer][e] for step_loads in loads] for e in range(experts)]
        image = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0.0,
                          vmax=min(1.0, 4.0 / experts), extent=(steps[0], steps[-1], experts - 0.5, -0.5))
        ax.set_ylabel(f"layer {layer}\nexpert", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[-1, 0].set_xlabel("step")
    axes[0, 0].set_title(title or f"Expert load (fair share = {1 / experts:.3f})")
    fig.colorbar(image, ax=axes[:, 0].tolist(), shrink=0.8, label="share of tokens")
    fig.savefig(out)
    plt.close(fig)
    return out


class Report:
    """A Markdown document assembled section by section, written as report.md and report.html."""

    def __init__(self, title: str):
        self.lines = [f"# {title}", "",
                      f"{datetime.datetime.now().isoformat(timespec='seconds')} on "
                      f"{platform.node() or 'this machine'} ({platform.processor() or platform.machine()}, "
                      f"torch {torch.__version__})", ""]
        self.title = title

    def section(self, heading: str) -> None:
        self.lines += [f"## {heading}", ""]

    def facts(self, facts: dict[str, Any]) -> None:
        self.lines += ["| | |", "|---|---|", *[f"| {k} | {_cell(v)} |" for k, v in facts.items()], ""]

    def table(self, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        self.lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
                       *["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows], ""]

    def markdown(self, text: str) -> None:
        self.lines += [text.rstrip(), ""]

    def image(self, path: Path | None, alt: str) -> None:
        if path is not None:
            self.lines += [f"![{alt}]({path.name})", ""]

    def samples(self, samples: Sequence[tuple[str, str]]) -> None:
        for prompt, text in samples:
            self.lines += [f"**{prompt}**", "", "> " + text.replace("\n", "\n> "), ""]

    def write(self, out_dir: Path) -> Path:
        """report.md and report.html in out_dir; returns the Markdown path."""
        text = "\n".join(self.lines).rstrip() + "\n"
        md_path = out_dir / "report.md"
        md_path.write_text(text)
        (out_dir / "report.html").write_text(to_html(text, self.title, out_dir))
        return md_path


def to_html(markdown_text: str, title: str, image_dir: Path) -> str:
    """Standalone HTML: Markdown rendered, local PNGs embedded as data URIs."""
    import markdown

    body = markdown.markdown(markdown_text, extensions=["tables"])

    def embed(match: re.Match) -> str:
        path = image_dir / match.group(1)
        if not path.is_file():
            return match.group(0)
        data = base64.b64encode(path.read_bytes()).decode()
        return f'src="data:image/png;base64,{data}"'

    body = re.sub(r'src="([^"/]+\.png)"', embed, body)
    style = ("body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}"
             "table{border-collapse:collapse;margin:1rem 0}td,th{border:1px solid #ccc;padding:.25rem .5rem;"
             "text-align:left}blockquote{border-left:3px solid #ccc;margin:0;padding-left:1rem;color:#444}"
             "img{max-width:100%}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{body}</body></html>\n")


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value).replace("|", "\\|").replace("\n", " ")

