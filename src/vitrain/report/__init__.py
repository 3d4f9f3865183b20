"""Run reports: written at the end of every run (run_report), read and compared
(`python -m vitrain.report`, the notebook) from the same package."""

from vitrain.report.compare import (
    SPEEDUP,
    Comparison,
    ReportError,
    compare,
    find_reports,
    flatten,
    format_value,
    load_reports,
    plot,
    run_settings,
    setting_str,
    setting_text,
    to_markdown,
    write_csv,
)
from vitrain.report.run_report import MISSING, REPORT_NAME

__all__ = [
    "MISSING",
    "REPORT_NAME",
    "SPEEDUP",
    "Comparison",
    "ReportError",
    "compare",
    "find_reports",
    "flatten",
    "format_value",
    "load_reports",
    "plot",
    "run_settings",
    "setting_str",
    "setting_text",
    "to_markdown",
    "write_csv",
]
