"""run_report.json: what ran, where, and how fast; read by `python -m vitrain.report`."""

import json
import os
import statistics
from pathlib import Path
from typing import Any

SCHEMA = 1
_SUMMARY_FROM_EPOCHS = {
    "epoch_time_s": "perf/epoch_time_s",
    "images_per_s": "perf/images_per_s",
    "images_per_s_per_device": "perf/images_per_s_per_device",
    "step_time_ms": "perf/step_time_ms",
    "data_wait_frac": "perf/data_wait_frac",
    "mfu": "perf/mfu",
    "gpu_util": "perf/gpu_util",
    "gpu_power_w": "perf/gpu_power_w",
}


def _steady(epochs: list[dict], key: str) -> float | None:
    """Median over the epochs after the first (which pays for warm-up), or the first alone."""
    values = [e[key] for e in epochs if key in e]
    if not values:
        return None
    return statistics.median(values[1:] if len(values) > 1 else values)


def summarize(epochs: list[dict], max_epochs: int | None, wall_time_s: float) -> dict[str, Any]:
    summary: dict[str, Any] = {"epochs_run": len(epochs)}
    for name, key in _SUMMARY_FROM_EPOCHS.items():
        value = _steady(epochs, key)
        if value is not None:
            summary[name] = value
    first_step = [e["perf/first_step_s"] for e in epochs if "perf/first_step_s" in e]
    if first_step:
        summary["first_step_s"] = first_step[0]
    memory = [e["perf/gpu_mem_gb"] for e in epochs if "perf/gpu_mem_gb" in e]
    if memory:
        summary["gpu_mem_gb"] = max(memory)
    accuracy = [e["val/acc1"] for e in epochs if "val/acc1" in e]
    summary["best_val_acc1"] = max(accuracy) if accuracy else None
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
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path


def _fmt(value: Any, spec: str, scale: float = 1.0) -> str:
    return "–" if value is None else format(value * scale, spec)


def format_summary(report: dict) -> str:
    """The short table printed at the end of a run."""
    c, s = report["config"], report["summary"]
    rows = [
        (
            "run",
            f"{c['model']} {c['precision']} {c['strategy']} x{c['devices'] * c['nodes']}"
            f" batch {c['global_batch']} ({c['container']})",
        ),
        ("epochs", f"{s['epochs_run']} of {c['max_epochs']}"),
        ("epoch time (median)", _fmt(s.get("epoch_time_s"), ".2f") + " s"),
        (
            "images/s",
            _fmt(s.get("images_per_s"), ",.1f")
            + f"  ({_fmt(s.get('images_per_s_per_device'), ',.1f')} per device)",
        ),
        ("step time (median)", _fmt(s.get("step_time_ms"), ".1f") + " ms"),
        ("first step (start-up, compile)", _fmt(s.get("first_step_s"), ".1f") + " s"),
        ("data wait", _fmt(s.get("data_wait_frac"), ".1f", 100) + " %"),
        ("MFU", _fmt(s.get("mfu"), ".1f", 100) + " %"),
        (
            "GPU util / peak memory",
            _fmt(s.get("gpu_util"), ".0f") + " % / " + _fmt(s.get("gpu_mem_gb"), ".1f") + " GB",
        ),
        ("best val/acc1", _fmt(s.get("best_val_acc1"), ".2f", 100) + " %"),
        ("wall time", _fmt(s.get("wall_time_s"), ".1f") + " s"),
        ("projected for all epochs", _fmt(s.get("projected_wall_time_s"), ".1f") + " s"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


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
) -> dict:
    """Config essentials, environment, per-epoch figures and their summary."""
    from vitrain.models.module import compile_mode
    from vitrain.perf.environment import capture_environment

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
        "global_batch": cfg.data.batch_size,
        "per_device_batch": cfg.data.batch_size // trainer.world_size,
        "accumulate_grad_batches": trainer.accumulate_grad_batches,
        "container": container.get("kind"),
        # false, or the torch.compile mode ("default", "max-autotune", ...)
        "compile": compile_mode(cfg.compile, cfg.trainer.accelerator) or False,
        "max_epochs": trainer.max_epochs,
        "seed": cfg.seed,
        "tags": list(cfg.tags),
    }
    return {
        "schema": SCHEMA,
        "run": run,
        "config": config,
        "overrides": _overrides(),
        "environment": capture_environment(cfg.paths.root_dir, container),
        "epochs": epochs,
        "summary": summarize(epochs, trainer.max_epochs, run["wall_time_s"]),
    }
