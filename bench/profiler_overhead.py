"""What `perf.profile_steps` costs: profiled training steps against unprofiled ones of the same
run, the one step that writes the trace, and the summary after training.

Runs `vitrain.train.train` on the config `python train.py experiment=speed ...` composes
(synthetic batches on the device, no validation), one epoch of `--batches` steps with
`perf.profile_steps=[start, end]`, and times every iteration at `on_train_batch_start` (host
clock, device synchronised: one whole loop iteration, as the profiler's ProfilerStep spans):

    python bench/profiler_overhead.py [--repeats 3] [--batches 40] [--window 20,30] [--set K=V]

Prints the median iteration outside the window (after `start - 10`), inside it, their ratio,
the iteration at `end` (the trace written and gzipped) and the time from the end of the loop
to the end of training (the trace's events read and summarised), per run and pooled.
"""

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import compose_config, machine_header, quiet_lightning  # noqa: E402

from vitrain.perf.speed import synchronized_now  # noqa: E402
from vitrain.train import train  # noqa: E402


class IterationTimes(pl.Callback):
    """Host time from one on_train_batch_start to the next, device synchronised."""

    def __init__(self) -> None:
        self.starts: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.starts.append(synchronized_now(trainer))

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.starts.append(synchronized_now(trainer))

    def on_fit_end(self, trainer, pl_module) -> None:
        self.summarised = synchronized_now(trainer)  # after every callback's on_train_end

    def iterations(self) -> list[float]:
        return [b - a for a, b in zip(self.starts, self.starts[1:], strict=False)]


def one_run(args, start: int, end: int, out: Path) -> tuple[float, float, float, float]:
    overrides = [
        "experiment=speed",
        f"model={args.model}",
        f"data.image_size={args.image_size}",
        f"data.batch_size={args.batch}",
        f"data.train_batches={args.batches}",
        "trainer.max_epochs=1",
        f"trainer.accelerator={args.accelerator}",
        "trainer.enable_progress_bar=false",
        "logger=none",
        f"perf.profile_steps=[{start},{end}]",
        *args.set,
    ]
    times = IterationTimes()
    train(compose_config(overrides, out), callbacks=[times])
    it = times.iterations()
    outside = it[max(start - 10, 1) : start - 1] + it[end + 1 :]  # warmed up, unprofiled
    summary = times.summarised - times.starts[-1]
    return statistics.median(outside), statistics.median(it[start:end]), it[end], summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--window", default="20,30", help="start,end of perf.profile_steps")
    parser.add_argument("--model", default="vit_micro")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    start, end = (int(v) for v in args.window.split(","))
    if args.threads:
        torch.set_num_threads(args.threads)
    quiet_lightning()
    print(machine_header())
    print(f"load average at the start: {os.getloadavg()[0]:.2f}")
    print(
        f"{args.model}, {args.image_size} px, batch {args.batch}, {args.accelerator}, "
        f"torch threads {torch.get_num_threads()}, window [{start}, {end}) of {args.batches}\n"
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            rows.append(one_run(args, start, end, Path(tmp) / str(i)))
    print(
        "| run | unprofiled step (ms) | profiled step (ms) | ratio | step writing the trace (s) "
        "| summary after training (s) |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    rows = [(off, on, on / off, write, summary) for off, on, write, summary in rows]
    pooled = [statistics.median(column) for column in zip(*rows, strict=True)]
    for name, (off, on, ratio, write, summary) in [*enumerate(rows, 1), ("median", pooled)]:
        print(
            f"| {name} | {off * 1e3:.1f} | {on * 1e3:.1f} | {ratio:.3f} | {write:.2f} "
            f"| {summary:.2f} |"
        )
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
