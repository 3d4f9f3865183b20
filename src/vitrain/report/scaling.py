"""Scaling efficiency: `python -m vitrain.report PATH ... --scaling`.

For runs that differ only in the number of devices, each multi-device run against the 1-device
run with the same global batch (strong scaling: the same work split over more devices) or the
same per-device batch (weak scaling: more work, as many images per device), the two kinds of
NVIDIA's DeepLearningExamples performance tables ("Strong scaling" with the total batch fixed,
"Weak scaling" with the batch per GPU fixed; both are throughput(N) / throughput(1)):

    scaling    = images/s(N) / images/s(1)
    efficiency = scaling / N = images/s/device(N) / images/s(1)

For strong scaling this is also time(1) / (N x time(N)) for the same images: 100 % means N
devices finish the same work N times sooner, for weak scaling that N devices each keep the
single device's pace. images/s are the run reports' (median of the epochs after the first).
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vitrain.perf.metrics import BY_NAME, SCALING
from vitrain.report.compare import ReportError, _number, _run_name, flatten, setting_str
from vitrain.report.run_report import MISSING

# Config keys that change with the number of devices; every other key must match.
DEVICE_KEYS = (
    "devices",
    "nodes",
    "strategy",
    "global_batch",
    "per_device_batch",
    "batch_size_found",
)
BASELINE, STRONG, WEAK = "1 device", "strong", "weak"
_SPEED = ("images_per_s", "images_per_s_per_device")
_FIXED = ["devices", "global_batch", "per_device_batch"]  # shown in every row


@dataclass
class Scaling:
    """Rows of the scaling table: per group of runs, its 1-device runs, then strong, then weak."""

    settings: list[str]  # the config keys that tell the groups apart (none for one group)
    rows: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)

    @property
    def keys(self) -> list[str]:
        return [*self.settings, "kind", *_FIXED, *_SPEED, *(m.name for m in SCALING), "run"]


def _world(config: dict[str, Any]) -> int | None:
    devices, nodes = config.get("devices"), config.get("nodes") or 1
    return devices * nodes if isinstance(devices, int) and isinstance(nodes, int) else None


def scaling(reports: Sequence[dict[str, Any]]) -> Scaling:
    """Pair each multi-device run with its 1-device run; an error when there is no pair."""
    groups: dict[tuple, list[tuple[dict, dict]]] = {}
    for report in reports:
        config = flatten(report.get("config") or {})
        key = tuple(sorted((k, setting_str(v)) for k, v in config.items() if k not in DEVICE_KEYS))
        groups.setdefault(key, []).append((config, report))
    varying = _varying_settings([dict(key) for key in groups])
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    for key, runs in groups.items():
        group = {k: v for k, v in key if k in varying}
        pairs = _pairs(runs, notes)
        for config, report in runs:  # each 1-device run that something is compared with
            if any(base[1] is report for _, base, _ in pairs):
                rows.append(_row(group, BASELINE, (config, report), (config, report)))
        order = {STRONG: 0, WEAK: 1}
        for kind, base, run in sorted(pairs, key=lambda p: (order[p[0]], _world(p[2][0]))):
            rows.append(_row(group, kind, run, base))
    if not any(row["kind"] != BASELINE for row in rows):
        raise ReportError(
            "--scaling: no multi-device run has a 1-device run with otherwise the same settings "
            "and the same global batch (strong scaling) or per-device batch (weak scaling); run "
            "e.g. `python train.py -m strategy=ddp trainer.devices=1,8 data.batch_size=1024` "
            "(strong), or trainer.devices=8 with 8 times the 1-device data.batch_size (weak)"
        )
    return Scaling(varying, rows, notes)


def _pairs(runs: list[tuple[dict, dict]], notes: list[str]) -> list[tuple[str, tuple, tuple]]:
    """(kind, 1-device run, N-device run) for each N-device run of one group of settings."""
    singles = [run for run in runs if _world(run[0]) == 1]
    pairs = []
    for config, report in runs:
        world = _world(config)
        if world is None or world == 1:
            continue
        matched = False
        for kind, batch in ((STRONG, "global_batch"), (WEAK, "per_device_batch")):
            bases = [s for s in singles if s[0].get("global_batch") == config.get(batch)]
            if bases:
                pairs.append((kind, bases[0], (config, report)))
                matched = True
            if len(bases) > 1:
                notes.append(
                    f"{len(bases)} 1-device runs have global batch {config.get(batch)}: "
                    f"{_run_name(report)} is compared with the first, {_run_name(bases[0][1])}"
                )
        if not matched:
            notes.append(
                f"{_run_name(report)} ({world} devices, global batch {config.get('global_batch')})"
                " has no 1-device run with its global or per-device batch and otherwise the "
                "same settings"
            )
    return pairs


def _varying_settings(keys: list[dict[str, str]]) -> list[str]:
    names = list(dict.fromkeys(k for key in keys for k in key))
    return [n for n in names if len({key.get(n, MISSING) for key in keys}) > 1]


def _row(group: dict, kind: str, run: tuple, base: tuple) -> dict[str, Any]:
    (config, report), base_summary = run, base[1].get("summary") or {}
    summary = report.get("summary") or {}
    ips, base_ips = _number(summary.get("images_per_s")), _number(base_summary.get("images_per_s"))
    world = _world(config)
    factor = ips / base_ips if ips is not None and base_ips else None
    row = {**group, "kind": kind, "devices": world}
    row |= {k: config.get(k) for k in ("global_batch", "per_device_batch")}
    row |= {
        "images_per_s": ips,
        "images_per_s_per_device": _number(summary.get("images_per_s_per_device")),
        "scaling": factor,
        "scaling_efficiency": None if factor is None else factor / world,
        "run": _run_name(report),
    }
    return row


def _labels(s: Scaling) -> dict[str, str]:
    labels = {k: k for k in s.settings} | {"kind": "kind", "devices": "devices"}
    labels |= {"global_batch": "global batch", "per_device_batch": "per-device batch"}
    labels |= {name: BY_NAME[name].header for name in _SPEED}
    return labels | {m.name: m.header for m in SCALING} | {"run": "run"}


_METRICS = {name: BY_NAME[name] for name in _SPEED} | {m.name: m for m in SCALING}


def _cell(key: str, value: Any) -> str:
    if key in _METRICS:
        return _METRICS[key].format(_METRICS[key].shown(value), MISSING)
    return MISSING if value is None else setting_str(value)


def scaling_markdown(s: Scaling) -> str:
    """The scaling table (GitHub Markdown) and what its columns are relative to."""
    labels = _labels(s)

    def line(cells: Iterable[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"

    numeric = {*_FIXED, *_SPEED, *(m.name for m in SCALING)}
    out = [line(labels[k] for k in s.keys)]
    out.append("|" + "|".join("---:" if k in numeric else "---" for k in s.keys) + "|")
    out += [line(_cell(k, row.get(k)) for k in s.keys) for row in s.rows]
    notes = [
        "scaling = images/s / images/s of the 1-device run with the same global batch (strong) "
        "or per-device batch (weak); efficiency = scaling / devices",
        *s.notes,
    ]
    return "\n".join(out + [""] + [f"_{note}_" for note in notes])


def write_scaling_csv(s: Scaling, path: str | Path) -> None:
    """The scaling rows as numbers (efficiency in percent: scaling_efficiency_pct), empty when
    absent; the same columns as `--csv` writes for the comparison where they share a metric."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(_METRICS[k].column if k in _METRICS else k for k in s.keys)
        for row in s.rows:
            values = [
                _METRICS[k].shown(row.get(k)) if k in _METRICS else row.get(k) for k in s.keys
            ]
            writer.writerow("" if v is None else v for v in values)
