"""`perf.profile_steps=[start, end]` (or `debug=profiler`): a torch.profiler trace of training
batches start..end-1, and its summary, the `profile` block of run_report.json.

A callback around `torch.profiler.profile` and its `schedule`, rather than Lightning's
PyTorchProfiler (`trainer.profiler`): Lightning's steps one schedule at the end of every
training_step *and* validation_step, wraps every nn.Module in a record_function by default, and
summarises as a text table. This one steps the schedule at each training batch's start, so a
profiled step is one whole iteration of the loop (waiting for the batch, the step, the optimizer,
every hook), as StepWindow times it, and `ProfilerStep#N` in the trace is training batch N.

Off (`perf.profile_steps: false`, the default) the callback is not built (conf/callbacks/
profiler.yaml), so no profiler object exists. On, each rank writes
`<run dir>/profiler/rank<R>.pt.trace.json.gz` (Perfetto, chrome://tracing, TensorBoard's
profiler plugin open it); rank 0 summarises its own trace and, in an online wandb run, logs the
traces of every rank as one artifact of type `profile`.

What the summary's shares mean: vitrain.perf.metrics.PROFILE_SHARES and README "Profiling".
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.autograd import DeviceType

from vitrain.errors import UserError
from vitrain.loggers import online_wandb_run
from vitrain.perf.speed import SpeedMonitor
from vitrain.runtime import training_device

MATMUL, ELEMENTWISE, COMMUNICATION, OTHER = "matmul", "elementwise_norm", "communication", "other"
TRACE_GLOB = "rank*.pt.trace.json.gz"
DEVICE_WORK = ("kernel", "gpu_memcpy", "gpu_memset")  # Kineto's activity types of GPU work
STEP_PREFIX = "ProfilerStep"  # torch.profiler's annotation of each step (trace name ProfilerStep#N)
LOADER_PREFIX = "enumerate(DataLoader)"  # DataLoader.__next__'s record_function

# Names of ops (aten::..., as the profiler records them) and of GPU kernels, by kind. Checked in
# this order: collectives, inductor's pointwise/reduction kernels (their names may hold "mm" from
# the op they follow), matrix products, then elementwise/norm; anything else is "other".
_COMMUNICATION = re.compile(r"nccl|^c10d::|^gloo|^record_param_comms", re.IGNORECASE)
_INDUCTOR_POINTWISE = re.compile(r"^(triton_(poi|red|per)_|cpp_fused)")
_MATMUL_OP = re.compile(
    r"^(aten|mkldnn)::(_?(add)?b?mm|addbmm|matmul|linear|addmv|mv|dot|einsum|\w*convolution\w*"
    r"|conv\dd|\w*scaled_dot_product\w*|_\w*attention\w*|_linear_pointwise)$"
)
_MATMUL_KERNEL = re.compile(
    r"gemm|gemv|cutlass|cublas|xmma|wgmma|nvjet|flash|fmha|attention|triton_tem_|conv",
    re.IGNORECASE,
)
_ELEMENTWISE_OP = re.compile(
    r"^aten::(_foreach_\w+|_fused_\w+|(native_)?(layer|group|batch|rms)_norm\w*|_?(log_)?softmax\w*"
    r"|(native_)?dropout\w*|gelu\w*|silu\w*|relu\w*|threshold\w*|sigmoid\w*|tanh\w*|erf\w*"
    r"|add_?|sub_?|rsub|mul_?|div_?|neg|exp_?|log_?|pow_?|sqrt_?|rsqrt_?|reciprocal_?|abs|sgn"
    r"|sign|clamp\w*|where|maximum|minimum|lerp_?|addcmul_?|addcdiv_?|fill_|zero_|copy_"
    r"|bernoulli_?|uniform_|normal_|masked_fill_?|sum|mean|norm|linalg_vector_norm|nll_loss\w*"
    r"|eq|ne|lt|le|gt|ge)$"
)
_ELEMENTWISE_KERNEL = re.compile(
    r"elementwise|vectorized|norm|softmax|reduce|reduction|multi_tensor_apply|adam|dropout|gelu",
    re.IGNORECASE,
)


def classify(name: str) -> str:
    """The kind of an op or kernel by its name: matmul, elementwise_norm, communication, other."""
    if _COMMUNICATION.search(name):
        return COMMUNICATION
    if _INDUCTOR_POINTWISE.search(name):
        return ELEMENTWISE
    if _MATMUL_OP.match(name) or (not name.startswith("aten::") and _MATMUL_KERNEL.search(name)):
        return MATMUL
    if _ELEMENTWISE_OP.match(name) or (
        not name.startswith("aten::") and _ELEMENTWISE_KERNEL.search(name)
    ):
        return ELEMENTWISE
    return OTHER


def check_steps(steps: Any) -> tuple[int, int]:
    """[start, end] from perf.profile_steps; a UserError naming the value and the fix."""
    fix = (
        "set perf.profile_steps=[start,end] with 1 <= start < end (training batches start to "
        "end-1 are traced, batch start-1 warms the profiler up), e.g. perf.profile_steps=[10,15]; "
        "false turns profiling off"
    )
    if not isinstance(steps, Sequence) or isinstance(steps, str) or len(steps) != 2:
        raise UserError(f"perf.profile_steps={steps}: {fix}.")
    if not all(isinstance(s, int) and not isinstance(s, bool) for s in steps):
        raise UserError(f"perf.profile_steps={list(steps)}: two whole numbers are needed; {fix}.")
    start, end = steps
    if not 1 <= start < end:
        raise UserError(f"perf.profile_steps=[{start}, {end}]: {fix}.")
    return start, end


class StepProfiler(pl.Callback):
    """Profiles training batches [start, end) with torch.profiler; `summary` is the run report's
    `profile` block (rank 0), None until a trace has been written.

    steps: [start, end] (perf.profile_steps), counted from 0 over this run's training batches,
    across epochs. dirpath: where each rank writes its trace. top: ops/kernels listed.
    """

    def __init__(self, steps: Sequence[int], dirpath: str, top: int = 10) -> None:
        self.start, self.end = check_steps(steps)
        self.dirpath = Path(dirpath)
        self.top = top
        self.summary: dict[str, Any] | None = None
        self._profiler: torch.profiler.profile | None = None
        self._monitor: SpeedMonitor | None = None
        self._batches = 0
        self._wait_at: dict[int, float] = {}  # the monitor's data wait at the window's ends
        self._recorded: torch.profiler.profile | None = None  # rank 0's, until summarised
        self._device = "cpu"
        self._rank = 0
        self._is_zero = True

    @property
    def trace_path(self) -> Path:
        return self.dirpath / f"rank{self._rank}.pt.trace.json.gz"

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._monitor = next((c for c in trainer.callbacks if isinstance(c, SpeedMonitor)), None)
        self._device = training_device(trainer).type
        self._rank, self._is_zero = trainer.global_rank, trainer.is_global_zero

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from torch.profiler import ProfilerActivity, profile, schedule

        activities = [ProfilerActivity.CPU]
        if self._device == "cuda":
            activities.append(ProfilerActivity.CUDA)
        self._batches = 0
        # Step n of the schedule is training batch n: batches before start-1 wait, start-1 warms
        # up (traced and discarded), start..end-1 are recorded, and at batch end the trace is
        # ready. Started here, so that step 0 is the first batch.
        self._profiler = profile(
            activities=activities,
            schedule=schedule(
                wait=self.start - 1, warmup=1, active=self.end - self.start, repeat=1
            ),
            on_trace_ready=self._trace_ready,
        )
        self._profiler.start()

    def on_train_batch_start(self, trainer, pl_module, batch: Any, batch_idx: int) -> None:
        n, self._batches = self._batches, self._batches + 1
        if self._profiler is None:
            return
        if n in (self.start, self.end):
            self._read_data_wait(n)
        if n > 0:
            self._profiler.step()  # at n == end: the trace is written
        if n >= self.end:
            self._stop()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._profiler is not None:  # the run ended inside (or before) the window
            self._read_data_wait(self.end)
            self._stop()
        self._summarize()
        trainer.strategy.barrier("profiler traces written")  # every rank's, before the upload
        if self._is_zero and self.summary is None:
            rank_zero_warn(
                f"perf.profile_steps=[{self.start}, {self.end}]: the run ended after "
                f"{self._batches} training batches, before batch {self.start}; no trace was "
                "written. Profile earlier batches or train longer."
            )
        if self._is_zero and self.summary is not None:
            run = online_wandb_run(trainer.loggers)
            if run is not None:
                self.summary["artifact"] = log_trace_artifact(
                    run, sorted(self.dirpath.glob(TRACE_GLOB)), self.summary
                )

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        with contextlib.suppress(Exception):  # never hide the exception that ended the run
            self._stop()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._stop()

    def _read_data_wait(self, n: int) -> None:
        # SpeedMonitor (listed before this callback) has added the wait before batch n already.
        if self._monitor is not None and n not in self._wait_at:
            self._wait_at[n] = self._monitor.data_wait_s

    def _stop(self) -> None:
        profiler, self._profiler = self._profiler, None
        if profiler is not None:
            profiler.stop()  # inside the window: writes the steps recorded so far

    def _trace_ready(self, profiler: torch.profiler.profile) -> None:
        path = self.trace_path
        path.parent.mkdir(parents=True, exist_ok=True)
        profiler.export_chrome_trace(str(path))  # .gz: gzipped by torch
        if self._is_zero:  # the run report is rank 0's; summarised after the loop (see _summarize)
            self._recorded = profiler
            last = min(self._batches, self.end) - 1  # fewer when the run ended in the window
            print(
                f"profiler: trace of training batches {self.start}-{last} in {path} "
                "(open it in https://ui.perfetto.dev or chrome://tracing)",
                flush=True,
            )

    def _summarize(self) -> None:
        # Reading the events (torch parses the whole trace) takes seconds: done once training
        # is over, so that no epoch's speed figures pay for it.
        profiler, self._recorded = self._recorded, None
        if profiler is None:
            return
        waits = [self._wait_at.get(n) for n in (self.start, self.end)]
        wait = None if None in waits else waits[1] - waits[0]
        self.summary = {
            "steps": [self.start, self.end],
            **summarize_events(profiler.events(), self._device == "cuda", wait, self.top),
            "trace": str(self.trace_path),
            "artifact": None,
        }


def log_trace_artifact(run, files: Iterable[Path], summary: dict[str, Any]) -> str:
    """Log the trace files as one wandb artifact of type `profile`; returns its name."""
    import wandb

    artifact = wandb.Artifact(
        f"profile-{run.id}",
        type="profile",
        description="torch.profiler traces (one per rank) of training batches "
        f"{summary['steps'][0]}-{summary['steps'][1] - 1}",
        metadata={"steps": summary["steps"], "shares": summary.get("shares")},
    )
    for file in files:
        artifact.add_file(str(file))
    run.log_artifact(artifact)
    return artifact.name


def summarize_events(
    events: Sequence, on_gpu: bool, data_wait_s: float | None, top: int = 10
) -> dict[str, Any]:
    """Where the profiled steps' time went, from torch.profiler's events (`profile.events()`).

    The wall time is that of the ProfilerStep annotations (consecutive steps, host clock). On a
    GPU each kernel counts with its launching op's kind (cuBLAS kernel names do not always say
    gemm), else its own name's; busy is the union of kernel, copy and memset intervals in the
    window. On a CPU the training thread's torch ops inside the steps count with their self
    time, except the DataLoader's (the data wait). key_averages() would give the same totals per
    name, but without the launching op a kernel's kind is often unknown.
    """
    steps = [
        e for e in events if e.device_type == DeviceType.CPU and e.name.startswith(STEP_PREFIX)
    ]
    if not steps:
        return {"steps_recorded": 0}
    t0 = min(e.time_range.start for e in steps)
    t1 = max(e.time_range.end for e in steps)
    wall_us = t1 - t0
    if on_gpu:
        items, busy_us = _kernel_times(events, t0, t1)
        basis = "GPU kernel time"
    else:
        items = list(_cpu_op_times(events))
        busy_us = None
        basis = "self CPU time of the training thread's torch ops"
    by_kind = {MATMUL: 0.0, ELEMENTWISE: 0.0, COMMUNICATION: 0.0, OTHER: 0.0}
    by_name: dict[str, list] = {}
    for name, kind, us in items:
        by_kind[kind] += us
        entry = by_name.setdefault(name, [0.0, 0, kind])
        entry[0] += us
        entry[1] += 1
    shares: dict[str, float | None] = {k: v / wall_us for k, v in by_kind.items()}
    wait = None if data_wait_s is None else min(data_wait_s * 1e6 / wall_us, 1.0)
    shares["data_wait"] = wait
    if busy_us is not None:  # GPU: no kernel running; the data wait is host time within it
        shares["idle"] = max(1.0 - busy_us / wall_us, 0.0)
    else:  # CPU: the training thread outside torch ops and outside the wait for data
        shares["idle"] = max(1.0 - sum(by_kind.values()) / wall_us - (wait or 0.0), 0.0)
    ranked = sorted(by_name.items(), key=lambda item: -item[1][0])[:top]
    return {
        "steps_recorded": len(steps),
        "device": "cuda" if on_gpu else "cpu",
        "basis": basis,
        "wall_s": wall_us / 1e6,
        "step_ms": wall_us / 1e3 / len(steps),
        "shares": shares,
        "top": [
            {
                "name": name if len(name) <= 90 else name[:87] + "...",
                "kind": kind,
                "ms": us / 1e3,
                "share": us / wall_us,
                "calls": calls,
            }
            for name, (us, calls, kind) in ranked
        ],
    }


def _kernel_times(events: Sequence, t0: float, t1: float) -> tuple[list, float]:
    ops = {
        e.id: e
        for e in events
        if e.device_type == DeviceType.CPU and not e.is_async and e.linked_correlation_id == 0
    }
    items, intervals = [], []
    for e in events:
        if not _is_device_work(e):
            continue
        start, end = max(e.time_range.start, t0), min(e.time_range.end, t1)
        if end <= start:
            continue  # queued before the window or run after it
        op = ops.get(e.linked_correlation_id)
        kind = classify(op.name) if op is not None else OTHER
        if kind == OTHER:
            kind = classify(e.name)
        items.append((e.name, kind, end - start))
        intervals.append((start, end))
    busy, reach = 0.0, t0
    for start, end in sorted(intervals):
        if end > reach:
            busy += end - max(start, reach)
            reach = end
    return items, busy


def _is_device_work(e) -> bool:
    if e.device_type == DeviceType.CPU:
        return False
    activity = getattr(e, "activity_type", None)  # GPU-side annotations are not work
    return activity in DEVICE_WORK if activity else not getattr(e, "is_user_annotation", False)


def _cpu_op_times(events: Sequence) -> Iterable[tuple[str, str, float]]:
    for e in events:
        if e.device_type != DeviceType.CPU or e.is_async or getattr(e, "is_user_annotation", 0):
            continue
        parent = e.cpu_parent
        while parent is not None and not parent.name.startswith((STEP_PREFIX, LOADER_PREFIX)):
            parent = parent.cpu_parent
        if parent is not None and parent.name.startswith(STEP_PREFIX):
            yield e.name, classify(e.name), e.self_cpu_time_total
