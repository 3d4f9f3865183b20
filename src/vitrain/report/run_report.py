"""run_report.json: what ran, where, and how fast; written by every run, read by
vitrain.report.compare (`python -m vitrain.report`) and the notebook."""

import json
import os
import statistics
from pathlib import Path
from typing import Any

from vitrain.perf.metrics import FIRST, LARGEST, LAST, METRICS, PROFILE_SHARES, STEADY, key

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
    if how == LAST:
        return values[-1]
    if how == LARGEST:
        return max(values)
    raise ValueError(f"no per-epoch summary '{how}'")


def time_to_accuracy(epochs: list[dict], targets: list[float]) -> dict[str, dict | None]:
    """For each target, when val/acc1 first reached it: the epoch, the wall time since the start
    of training (validation and checkpoints included), the training time (the epochs' loops
    alone) and the training images seen until then; None when the run never reached it."""
    reached: dict[str, dict | None] = {}
    for target in sorted(targets):
        train_s, found = 0.0, None
        for epoch in epochs:
            train_s += epoch.get(key("epoch_time_s"), 0.0)
            if epoch.get("val/acc1", -1.0) >= target:
                found = {
                    "epoch": epoch["epoch"],
                    "wall_s": epoch.get("elapsed_s"),
                    "train_s": train_s,
                    "images": epoch.get("images_seen"),
                }
                break
        reached[f"{target:g}"] = found
    return reached


def summarize(
    epochs: list[dict],
    max_epochs: int | None,
    wall_time_s: float,
    acc_targets: list[float] = (),
) -> dict[str, Any]:
    """The summary of run_report.json: each metric of vitrain.perf.metrics, as it says, and the
    time to each accuracy target."""
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
    if acc_targets:
        summary["time_to_acc"] = time_to_accuracy(epochs, list(acc_targets))
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
    for target, reached in (s.get("time_to_acc") or {}).items():
        when = "not reached"
        if reached:
            when = (
                f"{reached['wall_s']:.1f} s (epoch {reached['epoch']}, "
                f"{reached['train_s']:.1f} s training, {reached['images']:,.0f} images)"
            )
        rows.append((f"time to {float(target):.0%} val/acc1", when))
    rows += profile_rows(report.get("profile"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def profile_rows(profile: dict | None, top: int = 3) -> list[tuple[str, str]]:
    """The printed summary's lines for the profile block (perf.profile_steps), if there is one."""
    if not profile or not profile.get("steps_recorded"):
        return []
    start = profile["steps"][0]
    shares = profile["shares"]
    spent = ", ".join(
        f"{m.label} {m.format(m.shown(shares[m.name]))} {m.unit}"
        for m in PROFILE_SHARES
        # communication only where there was some (DDP); a share not measured is left out
        if shares.get(m.name) is not None and (m.name != "communication" or shares[m.name] > 0)
    )
    ops = ", ".join(f"{op['name'][:48]} {op['share']:.0%}" for op in profile["top"][:top])
    artifact = profile.get("artifact")
    return [
        (
            "profile",
            f"training batches {start}-{start + profile['steps_recorded'] - 1}, "
            f"{profile['wall_s']:.2f} s; {profile['basis']}",
        ),
        ("profile: time", spent),
        ("profile: top " + ("ops" if profile["device"] == "cpu" else "kernels"), ops),
        (
            "profile: trace",
            profile["trace"] + (f" (wandb artifact {artifact})" if artifact else ""),
        ),
    ]


def _attempts_note(report: dict) -> str:
    attempts = report.get("attempts") or []
    return f" ({len(attempts)} attempts)" if len(attempts) > 1 else ""


def hydra_choice(group: str, default: Any) -> Any:
    """The config group option this run chose (model=vit_b16 -> vit_b16), when Hydra ran it."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return HydraConfig.get().runtime.choices.get(group, default)
    return default


def hydra_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


# The command-line override that sets each config essential of build_run_report, so that
# `python -m vitrain.report` shows a setting once, by the essential's name and with the value the
# run used: `trainer.precision=bf16` ran as precision bf16-mixed, `trainer.devices=auto` on 8.
OVERRIDE_OF = {
    "model": "model",
    "model_name": "model.name",
    "image_size": "data.image_size",
    "num_classes": "data.num_classes",
    "data": "data",
    "precision": "trainer.precision",
    "strategy": "strategy",
    "accelerator": "trainer.accelerator",
    "devices": "trainer.devices",
    "nodes": "trainer.num_nodes",
    "global_batch": "data.batch_size",
    "accumulate_grad_batches": "trainer.accumulate_grad_batches",
    "container": "container",
    "compile": "runtime.compile",
    "max_epochs": "trainer.max_epochs",
    "seed": "seed",
    "tags": "tags",
}


def build_run_report(
    cfg,
    trainer,
    module,
    epochs: list[dict],
    container: dict,
    run: dict,
    batch_size_found: int | None = None,
    profile: dict | None = None,
    attempts: list[dict] | None = None,
) -> dict:
    """Config essentials, environment, per-epoch figures and their summary; `attempts`: every
    attempt of the run (report/attempts.py), `epochs` those of all of them.

    The batch is the datamodule's: the one that trained (Lightning's batch-size finder sets it
    there when tune.batch_size=true; batch_size_found is the finder's answer). profile: the
    profiler's summary (vitrain.perf.profiler), a `profile` block when perf.profile_steps is set.
    """
    from vitrain.perf.environment import capture_environment

    global_batch = trainer.datamodule.batch_size
    config = {
        "model": hydra_choice("model", cfg.model.name),
        "model_name": cfg.model.name,
        "params": sum(p.numel() for p in module.model.parameters()),
        "image_size": cfg.data.image_size,
        "num_classes": cfg.data.num_classes,
        "data": hydra_choice("data", None),
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
    summary = summarize(
        epochs, trainer.max_epochs, run["wall_time_s"], cfg.perf.get("acc_targets") or ()
    )
    summary["attempts"] = len(attempts or [])
    report = {
        "schema": SCHEMA,
        "run": run,
        "config": config,
        "overrides": hydra_overrides(),
        "environment": capture_environment(cfg.paths.root_dir, container),
        "attempts": attempts or [],
        "epochs": epochs,
        "summary": summary,
    }
    if profile is not None:
        report["profile"] = profile
    return report
