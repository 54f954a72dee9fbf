"""Run reports: report.md with plots and samples."""

from behemoth.report.report import plot_losses, write_report

__all__ = ["write_report", "plot_losses"]
