"""run_report.json: what ran, where, and how fast; written by every run, read by
vitrain.report.compare (`python -m vitrain.report`) and the notebook."""

import json
import os
import statistics
from pathlib import Path
from typing import Any

from vitrain.perf.metrics import FIRST, LARGEST, METRICS, STEADY

SCHEMA = 1
REPORT_NAME = "run_report.json"
MISSING = "–"  # shown for a value a run did not record (no GPU, unknown peak FLOPs ...)


def _over_epochs(epochs: list[dict], key: str, how: str) -> float | None:
    values = [e[key] for e in epochs if key in e]
    if not values:
        return None
    if how == STEADY:  # the first epoch pays for start-up and warm-up
        return statistics.median(values[1:] if len(values) > 1 else values)
    if how == FIRST:
        return values[0]
    if how == LARGEST:
        return max(values)
    raise ValueError(f"no per-epoch summary '{how}'")


def summarize(epochs: list[dict], max_epochs: int | None, wall_time_s: float) -> dict[str, Any]:
    """The summary of run_report.json: each metric of vitrain.perf.metrics, as it says."""
    summary: dict[str, Any] = {"epochs_run": len(epochs)}
    for metric in METRICS:
        if metric.key is not None:
            value = _over_epochs(epochs, metric.key, metric.summary)
            if value is not None:
                summary[metric.name] = value
    summary["wall_time_s"] = wall_time_s
    walls = [e["epoch_wall_s"] for e in epochs if "epoch_wall_s" in e]
    if walls and max_epochs and max_epochs > 0:
        overhead = max(wall_time_s - sum(walls), 0.0)  # start-up, sanity check, teardown
        later = statistics.median(walls[1:]) if len(walls) > 1 else walls[0]
        summary["projected_wall_time_s"] = overhead + walls[0] + later * (max_epochs - 1)
    return summary


def write_json_atomic(data: dict, path: Path) -> Path:
    """Write beside the target, then rename: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # a full disk leaves no empty temporary file
    return path


def format_summary(report: dict) -> str:
    """The short table printed at the end of a run: the run, then each summary figure."""
    c, s = report["config"], report["summary"]
    rows = [
        (
            "run",
            f"{c['model']} {c['precision']} {c['strategy']} x{c['devices'] * c['nodes']}"
            f" batch {c['global_batch']} ({c['container']})",
        ),
        ("epochs", f"{s['epochs_run']} of {c['max_epochs']}" + _attempts_note(report)),
    ]
    for metric in METRICS:
        label = f"{metric.label} (median)" if metric.summary == STEADY else metric.label
        shown = metric.shown(s.get(metric.name))
        rows.append((label, MISSING if shown is None else f"{metric.format(shown)} {metric.unit}"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def _attempts_note(report: dict) -> str:
    attempts = report.get("attempts") or []
    return f" ({len(attempts)} attempts)" if len(attempts) > 1 else ""


def _choice(group: str, default: Any) -> Any:
    """The config group option this run chose (model=vit_b16 -> vit_b16), when Hydra ran it."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return HydraConfig.get().runtime.choices.get(group, default)
    return default


def _overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def build_run_report(
    cfg,
    trainer,
    module,
    epochs: list[dict],
    container: dict,
    run: dict,
    batch_size_found: int | None = None,
    attempts: list[dict] | None = None,
) -> dict:
    """Config essentials, environment, per-epoch figures and their summary; `attempts`: every
    attempt of the run (report/attempts.py), `epochs` those of all of them.

    The batch is the datamodule's: the one that trained (Lightning's batch-size finder sets it
    there when tune.batch_size=true; batch_size_found is the finder's answer).
    """
    from vitrain.perf.environment import capture_environment

    global_batch = trainer.datamodule.batch_size
    config = {
        "model": _choice("model", cfg.model.name),
        "model_name": cfg.model.name,
        "params": sum(p.numel() for p in module.model.parameters()),
        "image_size": cfg.data.image_size,
        "num_classes": cfg.data.num_classes,
        "data": _choice("data", None),
        "precision": str(trainer.precision),
        "strategy": type(trainer.strategy).__name__,
        "accelerator": trainer.strategy.root_device.type,
        "devices": trainer.num_devices,
        "nodes": trainer.num_nodes,
        "global_batch": global_batch,
        "per_device_batch": global_batch // trainer.world_size,
        "batch_size_found": batch_size_found,
        "accumulate_grad_batches": trainer.accumulate_grad_batches,
        "container": container.get("kind"),
        # false, or the torch.compile mode ("default", "max-autotune", ...)
        "compile": module.hparams.compile or False,
        "max_epochs": trainer.max_epochs,
        "seed": cfg.seed,
        "tags": list(cfg.tags),
    }
    summary = summarize(epochs, trainer.max_epochs, run["wall_time_s"])
    summary["attempts"] = len(attempts or [])
    return {
        "schema": SCHEMA,
        "run": run,
        "config": config,
        "overrides": _overrides(),
        "environment": capture_environment(cfg.paths.root_dir, container),
        "attempts": attempts or [],
        "epochs": epochs,
        "summary": summary,
    }
