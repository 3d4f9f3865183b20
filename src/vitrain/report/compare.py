"""Read and compare run_report.json files: Markdown table, CSV and bar chart.

    python -m vitrain.report logs/multiruns/2026-11-26_10-00-00 --baseline container=pip \
        --csv runs.csv --plot runs.png

Each PATH may be a run directory, a multirun directory, any parent of them, or a report file.
Rows follow the order of the PATHs, then the natural order of the paths below each one (job 2
before job 10). The columns are the settings that differ between the runs (model, precision and
devices for a single run), the performance summary and a speed-up: images/s divided by the
baseline run's images/s. A run's settings (`run_settings`) are its report's config essentials
and its command-line overrides, such as the values an Optuna trial sampled; an override of an
essential is that essential's column (`trainer.precision=...` is `precision`).
`--baseline KEY=VALUE` picks the baseline by a setting (`container=pip`, `precision=32-true`,
`recipe.base_lr=1e-3`); when several runs match, the first one is used and the footer says so
(repeated runs of one setting are normal); no match is an error.
Only the standard library and matplotlib (for --plot) are used, so the CLI needs no pandas.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vitrain.errors import UserError
from vitrain.perf.metrics import COMPARED
from vitrain.report.run_report import MISSING, OVERRIDE_OF, REPORT_NAME

# Shown when a single run leaves no differing setting to tell rows apart by.
SINGLE_RUN_SETTINGS = ("model", "precision", "devices")
COLUMNS = {metric.column: metric for metric in COMPARED}  # CSV column -> its metric
SPEEDUP = "speedup"
TIME_TO = "time_to_"  # time_to_<percent>_s: wall seconds until val/acc1 first reached it
ESSENTIAL_OF = {override: essential for essential, override in OVERRIDE_OF.items()}


def accuracy_columns(reports: Sequence[dict[str, Any]]) -> dict[str, float]:
    """time_to_<percent>_s -> its target, for each accuracy target any report recorded."""
    targets = {
        float(target)
        for report in reports
        for target in ((report.get("summary") or {}).get("time_to_acc") or {})
    }
    return {f"{TIME_TO}{target * 100:g}_s": target for target in sorted(targets)}


def time_to(summary: dict[str, Any], target: float) -> float | None:
    """Wall seconds until val/acc1 first reached `target`; None when never (or not recorded)."""
    reached = (summary.get("time_to_acc") or {}).get(f"{target:g}")
    return _number(reached.get("wall_s")) if reached else None


class ReportError(UserError):
    """No report where one was expected, an unreadable one, or a --baseline that matches none."""


@dataclass
class Comparison:
    """One row per run; values are raw numbers (None when absent), keyed by `keys`."""

    settings: list[str]  # the settings shown: config essentials in config order, then overrides
    keys: list[str]  # every column key: settings, optionally "run", metrics, speed-up
    labels: dict[str, str]  # column key -> Markdown header
    rows: list[dict[str, Any]]
    run_labels: list[str]  # a short name per row ("container=ngc, precision=32-true")
    baseline_row: int = 0
    notes: list[str] = field(default_factory=list)


def _natural_key(path: Path) -> list[Any]:
    # Multirun jobs are numbered directories: compare digit runs as numbers so 2 sorts before 10.
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.as_posix())]


def find_reports(paths: Iterable[str | Path]) -> list[Path]:
    """Every run_report.json at or below each path, in path order; an error for a path with none."""
    found: list[Path] = []
    seen: set[Path] = set()  # a run reached through two PATHs is one row, at its first place
    for raw in paths:
        path = Path(raw)
        if path.is_file():
            hits = [path]
        else:
            hits = sorted(path.rglob(REPORT_NAME), key=_natural_key) if path.is_dir() else []
        if not hits:
            # A typo in one of several paths must not silently drop its runs from a comparison.
            raise ReportError(f"no {REPORT_NAME} found at or below {path}")
        for hit in hits:
            if hit.resolve() not in seen:
                seen.add(hit.resolve())
                found.append(hit)
    return found


def load_reports(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """The parsed reports, each with `_file` (its path) added."""
    reports = []
    for file in find_reports(paths):
        try:
            report = json.loads(file.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ReportError(f"cannot read {file}: {err}") from err
        if not isinstance(report, dict):
            raise ReportError(f"{file} is not a run report (expected a JSON object)")
        reports.append({**report, "_file": str(file)})
    return reports


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts become dotted keys, so `config` compares setting by setting."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def setting_str(value: Any) -> str:
    """A setting as a Hydra override writes it (true, 32-true, 8), which --baseline matches."""
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return ",".join(setting_str(v) for v in value)
    return str(value)


def setting_text(value: Any) -> str:
    """A setting as the table shows it: setting_str, with a float to 3 significant digits, in
    scientific notation below 0.01 and from 1000 on (3.2e-4, 0.05, 1e30)."""
    if not isinstance(value, float) or not math.isfinite(value) or value == 0:
        return setting_str(value)
    if 1e-2 <= abs(value) < 1e3:
        return f"{value:.3g}"
    mantissa, exponent = f"{value:.2e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def parse_value(text: str) -> Any:
    """An override's value: a number as a number, so that 1e-3 and 0.001 are one value;
    anything else as written."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def run_settings(report: dict[str, Any]) -> dict[str, Any]:
    """Every setting of one run, by which the comparison tells runs apart and --baseline picks
    one: the report's config essentials, then each command-line override (`overrides`: the
    values a trial sampled, a -m job's values) that sets no essential. The essential holds what
    the run used (`trainer.devices=auto` ran on `devices` 8): an override of it adds nothing."""
    settings = flatten(report.get("config") or {})
    for override in report.get("overrides") or []:
        key, _, value = override.partition("=")
        key = key.lstrip("+")  # `+key` adds what `key` would change: the same setting
        if ESSENTIAL_OF.get(key, key) not in settings:
            settings[key] = parse_value(value)
    return settings


def _number(value: Any) -> float | None:
    # Absent keys, nulls, NaN and non-numbers all read as "not recorded".
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return None
    return float(value)


def _run_name(report: dict[str, Any]) -> str:
    # The last two parts of the run directory: "runs/2026-..." or "2026-.../3" for a multirun job.
    parent = Path(report.get("_file") or report.get("run", {}).get("output_dir") or "?").parent
    return "/".join(parent.parts[-2:])


def _pick_baseline(configs: list[dict[str, Any]], baseline: str | None) -> tuple[int, list[str]]:
    if not baseline:
        return 0, []
    key, sep, value = baseline.partition("=")
    if not sep or not key:
        raise ReportError(f"--baseline {baseline}: expected KEY=VALUE, e.g. container=pip")
    key = ESSENTIAL_OF.get(key, key)  # trainer.precision=32-true: the precision column
    if not any(key in c for c in configs):
        known = ", ".join(sorted({k for c in configs for k in c}))
        raise ReportError(f"--baseline {baseline}: no run has config key {key!r} ({known})")
    wanted = setting_str(parse_value(value))  # 1e-3 matches a run's 0.001
    matches = [i for i, c in enumerate(configs) if key in c and setting_str(c[key]) == wanted]
    if not matches:
        seen = ", ".join(dict.fromkeys(setting_str(c.get(key)) for c in configs))
        raise ReportError(f"--baseline {baseline}: no run has {key}={value} (runs have {seen})")
    notes = []
    if len(matches) > 1:
        rows = ", ".join(str(i + 1) for i in matches)
        notes.append(
            f"{len(matches)} runs match {baseline} (rows {rows}); the first is the baseline"
        )
    return matches[0], notes


def compare(reports: Sequence[dict[str, Any]], baseline: str | None = None) -> Comparison:
    """The comparison table of `reports`; `baseline` is KEY=VALUE of a setting (default: row 1)."""
    if not reports:
        raise ReportError("no run reports to compare")
    configs = [run_settings(r) for r in reports]
    essentials = {k for r in reports for k in flatten(r.get("config") or {})}
    all_keys = list(dict.fromkeys(k for c in configs for k in c))
    if len(reports) == 1:
        settings = [k for k in SINGLE_RUN_SETTINGS if k in configs[0]]
    else:
        # A key missing from some runs differs from one that is present in all of them.
        settings = [
            k for k in all_keys if len({setting_str(c.get(k, MISSING)) for c in configs}) > 1
        ]
    run_labels = [
        ", ".join(f"{k}={setting_text(c[k]) if k in c else MISSING}" for k in settings)
        for c in configs
    ]
    # Repeats of one setting would give identical rows: add the run directory to tell them apart.
    show_run = len(reports) > 1 and len(set(run_labels)) < len(run_labels)
    if show_run or not settings:
        run_labels = [
            ", ".join(filter(None, [label, _run_name(r)]))
            for label, r in zip(run_labels, reports, strict=True)
        ]
    base, notes = _pick_baseline(configs, baseline)

    labels = {k: k for k in settings} | ({"run": "run"} if show_run else {})
    labels |= {column: metric.header for column, metric in COLUMNS.items()}
    accuracy = accuracy_columns(reports)
    labels |= {column: f"time to {target * 100:g} % (s)" for column, target in accuracy.items()}
    labels[SPEEDUP] = "speed-up"
    rows = []
    for config, report in zip(configs, reports, strict=True):
        summary = report.get("summary") or {}
        row: dict[str, Any] = {k: config.get(k) for k in settings}
        if show_run:
            row["run"] = _run_name(report)
        for column, metric in COLUMNS.items():
            row[column] = metric.shown(_number(summary.get(metric.name)))
        for column, target in accuracy.items():
            row[column] = time_to(summary, target)
        rows.append(row)
    base_ips = rows[base]["images_per_s"]
    for row in rows:
        ips = row["images_per_s"]
        row[SPEEDUP] = ips / base_ips if ips is not None and base_ips else None
    described = baseline or run_labels[base] or "the first run"
    notes.insert(0, f"speed-up = images/s / images/s of row {base + 1} ({described})")
    if accuracy:
        notes.append(
            "time to X %: wall seconds from the start of training until val/acc1 first reached "
            f"X ({MISSING}: not reached)"
        )
    # A failed trial of a search keeps its report: its figures are those of a run cut short.
    unfinished = [
        f"row {i + 1} {status}"
        for i, r in enumerate(reports)
        if (status := (r.get("run") or {}).get("status", "finished")) != "finished"
    ]
    if unfinished:
        notes.append(f"not finished: {', '.join(unfinished)}")
    # An override is recorded only by the runs that gave it: the others ran the config's value.
    unset = [k for k in settings if k not in essentials and any(k not in c for c in configs)]
    if unset:
        notes.append(f"{MISSING} under {', '.join(unset)}: not overridden (the config's value)")
    return Comparison(settings, list(labels), labels, rows, run_labels, base, notes)


def format_value(key: str, value: Any) -> str:
    """A cell as the Markdown table shows it; MISSING for a value the run did not record."""
    if key == SPEEDUP:
        return MISSING if value is None else f"{value:.2f}x"
    if key in COLUMNS:
        return COLUMNS[key].format(value, MISSING)
    if key.startswith(TIME_TO):
        return MISSING if value is None else f"{value:.1f}"
    return MISSING if value is None else setting_text(value)


def to_markdown(comparison: Comparison) -> str:
    """A GitHub Markdown table, followed by its notes (what the speed-up is relative to)."""
    c = comparison

    def line(cells: Iterable[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"

    # Settings are text (left-aligned); numbers are right-aligned so digits line up.
    numeric = {*COLUMNS, SPEEDUP, *(k for k in c.keys if k.startswith(TIME_TO))}
    out = [line(c.labels[k] for k in c.keys)]
    out.append("|" + "|".join("---:" if k in numeric else "---" for k in c.keys) + "|")
    out += [line(format_value(k, row[k]) for k in c.keys) for row in c.rows]
    return "\n".join(out + [""] + [f"_{note}_" for note in c.notes])


def write_csv(comparison: Comparison, path: str | Path) -> None:
    """The same rows with raw numbers (empty when absent) and machine-friendly headers."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(comparison.keys)
        for row in comparison.rows:
            cells = {k: setting_str(v) if k in comparison.settings else v for k, v in row.items()}
            writer.writerow("" if row[k] is None else cells[k] for k in comparison.keys)


def plot(comparison: Comparison, path: str | Path | None = None) -> Any:
    """Bar charts of images/s and epoch time per run (baseline in orange); saved to `path`.

    Returns the matplotlib Figure. Built with matplotlib.figure.Figure, not pyplot, so it
    renders with Agg headless and leaves a notebook's own backend alone.
    """
    from matplotlib.figure import Figure

    c = comparison
    n = len(c.rows)
    fig = Figure(figsize=(11, 1.2 + 0.5 * n), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    y = list(range(n))
    panels = [("images_per_s", "images/s"), ("epoch_time_s", "median epoch time (s)")]
    for ax, (key, title) in zip(axes, panels, strict=True):
        values = [row[key] for row in c.rows]
        # An absent value has no bar, only the MISSING mark, never a misleading zero.
        colors = ["tab:orange" if i == c.baseline_row else "tab:blue" for i in y]  # baseline
        bars = ax.barh(y, [math.nan if v is None else v for v in values], color=colors)
        ax.bar_label(bars, labels=[format_value(key, v) for v in values], padding=3)
        ax.set_title(title)
        ax.margins(x=0.2)
    axes[0].set_yticks(y, c.run_labels)
    axes[0].invert_yaxis()  # row 1 on top, as in the table
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig
