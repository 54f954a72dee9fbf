"""Run reports: report.md and a standalone report.html, with plots."""

from behemoth.report.report import Report, plot_expert_heatmap, plot_losses, plot_series, to_html

__all__ = ["Report", "plot_losses", "plot_series", "plot_expert_heatmap", "to_html"]
