"""Time to accuracy of recipes and resolution schedules on the quickstart's digits (CPU).

Runs `python train.py experiment=quickstart <arm> seed=<s>` for each arm and seed (in this
process, vitrain.train.train on the composed config) and prints, per arm, the median over seeds
of the wall time and training time until val/acc1 first reached --target, and of the best
val/acc1, with each seed's figures. The digits at 32 px show the mechanics (what a recipe or a
schedule does to time and accuracy through vitrain's own code paths), not ImageNet's results.

    python bench/recipes.py                # deit, deit3, deit3_no_ra, schedule 24 -> 32; seeds 0, 1
    python bench/recipes.py --seeds 0,1,2 --target 0.95 --arms deit,schedule

ARMS maps a name to its Hydra overrides: a new arm is one entry.
"""

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import compose_config, machine_header, quiet_lightning  # noqa: E402

from vitrain.train import train  # noqa: E402

ARMS: dict[str, list[str]] = {
    # The quickstart as it is: DeiT's AdamW and schedule, no mixup on 1,437 digits.
    "deit": [],
    # DeiT III: LAMB (lr 4e-3, its ViT-S value, not scaled), BCE, 3-Augment + colour jitter,
    # LayerScale, repeated augmentation x3; mixup stays off, as in the quickstart.
    "deit3": [
        "recipe=deit3", "recipe.base_lr=4e-3", "recipe.mixup_alpha=0", "recipe.cutmix_alpha=0"
    ],
    # The same without repeated augmentation: what the repeats cost or gain on their own.
    "deit3_no_ra": [
        "recipe=deit3", "recipe.base_lr=4e-3", "recipe.mixup_alpha=0", "recipe.cutmix_alpha=0",
        "data.repeated_aug=1",
    ],
    # Progressive resizing at FFCV's fractions of the run (74-86 %): 24 px, then up to 32 px.
    "schedule": [
        "data.resolution_schedule={start: 24, end: 32, start_epoch: 22, end_epoch: 26, step: 4}"
    ],
}  # fmt: skip


def run_arm(overrides: list[str], seed: int, target: float, out: Path, extra: list[str]) -> dict:
    cfg = compose_config(
        [
            "experiment=quickstart",
            *overrides,
            *extra,
            f"seed={seed}",
            f"perf.acc_targets=[{target}]",
            "logger=none",
            "callbacks=base",
            "trainer.enable_progress_bar=false",
        ],
        out,
    )
    with open(out / "train.log", "w") as log:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            train(cfg)
    summary = json.loads((out / "run_report.json").read_text())["summary"]
    reached = summary["time_to_acc"][f"{target:g}"] or {}
    return {
        "seed": seed,
        "wall_s": reached.get("wall_s"),
        "train_s": reached.get("train_s"),
        "epoch": reached.get("epoch"),
        "best_val_acc1": summary.get("best_val_acc1"),
        "run_wall_s": summary["wall_time_s"],
    }


def median(values: list) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if len(present) == len(values) and present else None


def fmt(value, spec: str) -> str:
    return "not reached" if value is None else format(value, spec)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--target", type=float, default=0.9)
    parser.add_argument("--json", type=Path, help="also write every run's figures here")
    parser.add_argument("--set", nargs="*", default=[], help="more overrides for every arm")
    args = parser.parse_args(argv)
    quiet_lightning()
    arms = args.arms.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    root = Path(tempfile.mkdtemp(prefix="vitrain-recipes-"))
    results = {}
    for arm in arms:  # arms one after the other, seeds within: the machine's drift hits all
        results[arm] = []
        for seed in seeds:
            out = root / f"{arm}-{seed}"
            out.mkdir()
            results[arm].append(run_arm(ARMS[arm], seed, args.target, out, args.set))
            print(f"  {arm} seed {seed}: {results[arm][-1]}", file=sys.stderr, flush=True)
    print(machine_header())
    extra = f", {' '.join(args.set)}" if args.set else ""
    print(f"experiment=quickstart (vit_micro, digits, 32 px{extra}), seeds {seeds}, medians")
    pct = f"{args.target:.0%}"
    print(
        f"| arm | time to {pct}: wall s | time to {pct}: training s | epoch | best val/acc1 "
        "| whole run s | per seed: wall s to target, best |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for arm, runs in results.items():
        per_seed = "; ".join(f"{fmt(r['wall_s'], '.1f')}, {r['best_val_acc1']:.1%}" for r in runs)
        print(
            f"| {arm} | {fmt(median([r['wall_s'] for r in runs]), '.1f')} "
            f"| {fmt(median([r['train_s'] for r in runs]), '.1f')} "
            f"| {fmt(median([r['epoch'] for r in runs]), '.0f')} "
            f"| {median([r['best_val_acc1'] for r in runs]):.1%} "
            f"| {median([r['run_wall_s'] for r in runs]):.1f} | {per_seed} |"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
