"""Exports of a model directory to other runtimes' formats: GGUF for llama.cpp."""

from behemoth.export.gguf import GGUF_DTYPES, ExportError, check_exportable, export_gguf

__all__ = ["GGUF_DTYPES", "ExportError", "check_exportable", "export_gguf"]
