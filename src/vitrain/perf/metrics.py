"""Every speed figure vitrain reports, in one table: SpeedMonitor logs the keys, the run report
summarises them, its printed summary and `python -m vitrain.report` show them from here.

| name | logged key | shown as | summary in run_report.json |
|---|---|---|---|
| epoch_time_s | perf/epoch_time_s | epoch time (s) | median of the epochs after the first |
| images_per_s | perf/images_per_s | images/s | median after the first |
| images_per_s_per_device | perf/images_per_s_per_device | images/s/device | median after 1st |
| step_time_ms | perf/step_time_ms | step time (ms) | median after the first |
| step_time_p90_ms | perf/step_time_p90_ms | step time p90 (ms) | median after the first |
| data_wait_frac | perf/data_wait_frac | data wait (%) | median after the first |
| mfu | perf/mfu | MFU (%) | median after the first |
| first_step_s | perf/first_step_s | first step (s) | the one value (start-up, compilation) |
| resize_step_s | perf/resize_step_s | first step at a new size (s) | the largest |
| image_size | perf/image_size | training size (px) | the last |
| gpu_util | perf/gpu_util | GPU util (%) | median after the first |
| gpu_power_w | perf/gpu_power_w | GPU power (W) | median after the first |
| gpu_mem_gb | perf/gpu_mem_gb | peak GPU mem (GB) | the largest |
| best_val_acc1 | val/acc1 | best val/acc1 (%) | the largest |
| wall_time_s | | wall time (s) | the whole run, start-up to report |
| projected_wall_time_s | | projected for all epochs (s) | start-up + epoch 1 + median x rest |

README "What every run measures" says what each means. Below the table: PROFILE_SHARES, the
`profile` block of a profiled run (README "Profiling"), and SCALING, the columns of
`python -m vitrain.report --scaling` (README "Scaling").
"""

from dataclasses import dataclass
from typing import Any

# How run_report.json summarises a metric over the epochs.
STEADY = "median after the first epoch"  # the first pays start-up, compilation and warm-up
FIRST = "the first value"
LAST = "the last value"
LARGEST = "the largest value"
RUN = "computed for the whole run"


@dataclass(frozen=True)
class Metric:
    name: str  # the run report's summary key
    key: str | None  # the per-epoch key logged to every logger; None for run-level figures
    label: str
    unit: str  # "%": shown as a percentage (`scale` turns a fraction into one)
    summary: str
    fmt: str = ".1f"
    scale: float = 1.0
    compared: bool = False  # a column of `python -m vitrain.report`

    @property
    def column(self) -> str:
        """The CSV column of `python -m vitrain.report --csv` (fractions as percentages)."""
        return f"{self.name}_pct" if self.unit == "%" else self.name

    @property
    def header(self) -> str:
        return f"{self.label} ({self.unit})" if self.unit else self.label

    def shown(self, value: Any) -> float | None:
        """The summary value as tables show it (scaled), or None when not recorded."""
        return None if value is None else value * self.scale

    def format(self, shown: float | None, missing: str = "–") -> str:
        return missing if shown is None else format(shown, self.fmt)


METRICS: tuple[Metric, ...] = (
    Metric("epoch_time_s", "perf/epoch_time_s", "epoch time", "s", STEADY, ".2f", compared=True),
    Metric("images_per_s", "perf/images_per_s", "images/s", "", STEADY, compared=True),
    Metric(
        "images_per_s_per_device",
        "perf/images_per_s_per_device",
        "images/s/device",
        "",
        STEADY,
        compared=True,
    ),
    Metric("step_time_ms", "perf/step_time_ms", "step time", "ms", STEADY),
    Metric("step_time_p90_ms", "perf/step_time_p90_ms", "step time p90", "ms", STEADY),
    Metric("data_wait_frac", "perf/data_wait_frac", "data wait", "%", STEADY, scale=100.0),
    Metric("mfu", "perf/mfu", "MFU", "%", STEADY, scale=100.0, compared=True),
    Metric("first_step_s", "perf/first_step_s", "first step", "s", FIRST, compared=True),
    Metric("resize_step_s", "perf/resize_step_s", "first step at a new size", "s", LARGEST),
    Metric("image_size", "perf/image_size", "training size", "px", LAST, ".0f"),
    Metric("gpu_util", "perf/gpu_util", "GPU util", "%", STEADY, ".0f", compared=True),
    Metric("gpu_power_w", "perf/gpu_power_w", "GPU power", "W", STEADY, ".0f"),
    Metric("gpu_mem_gb", "perf/gpu_mem_gb", "peak GPU mem", "GB", LARGEST, compared=True),
    Metric("best_val_acc1", "val/acc1", "best val/acc1", "%", LARGEST, ".2f", 100.0, compared=True),
    Metric("wall_time_s", None, "wall time", "s", RUN),
    Metric("projected_wall_time_s", None, "projected for all epochs", "s", RUN),
)
BY_NAME = {metric.name: metric for metric in METRICS}
COMPARED = tuple(metric for metric in METRICS if metric.compared)


def key(name: str) -> str:
    """The logged key of a metric, by its name: the one spelling every module uses."""
    logged = BY_NAME[name].key
    if logged is None:
        raise KeyError(f"{name} is a run-level figure, not logged per epoch")
    return logged


# --- the profile block of run_report.json (perf.profile_steps, vitrain.perf.profiler) ----------
PROFILED = "share of the profiled steps' wall time"

# Where the profiled steps' time went, keyed as in run_report.json's profile.shares. On a GPU the
# ops' shares are kernel time and idle is the time no kernel ran; on a CPU they are the training
# thread's self time in torch ops, and idle is its time outside ops and the data wait (Python,
# Lightning's loop, callbacks). Data wait is SpeedMonitor's host wait for batches in the window.
PROFILE_SHARES: tuple[Metric, ...] = (
    Metric("matmul", None, "matrix products", "%", PROFILED, ".0f", 100.0),
    Metric("elementwise_norm", None, "elementwise/norm", "%", PROFILED, ".0f", 100.0),
    Metric("communication", None, "communication", "%", PROFILED, ".0f", 100.0),
    Metric("other", None, "other ops", "%", PROFILED, ".0f", 100.0),
    Metric("data_wait", None, "data wait", "%", PROFILED, ".0f", 100.0),
    Metric("idle", None, "idle", "%", PROFILED, ".0f", 100.0),
)

# --- python -m vitrain.report --scaling (vitrain.report.scaling) --------------------------------
ACROSS_RUNS = "a multi-device run against the 1-device run of the same settings"

SCALING: tuple[Metric, ...] = (
    Metric("scaling", None, "scaling", "x", ACROSS_RUNS, ".2f"),  # images/s(N) / images/s(1)
    Metric("scaling_efficiency", None, "efficiency", "%", ACROSS_RUNS, ".1f", 100.0),  # / N
)
