"""Issue 16's preemption check, repeated: `python tests/preemption_loop.py [--tries 20]`.

A tool, not a test (pytest collects test_*.py only): each try starts `train.py
experiment=quickstart strategy=ddp_cpu trainer.max_epochs=5 logger=csv` in a fresh directory,
waits for epoch 0's checkpoint, waits a random 0-3 s more (the signal lands in a training step,
a validation run or a checkpoint save), sends SIGTERM to rank 0, to rank 1 or to both, and
records whether every rank exited with 143 within the bound, after saving a checkpoint of epoch
1 or later. Prints one line per try and a summary; exit code 1 when any try failed.
"""

import argparse
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ddp_ranks import DdpRun  # noqa: E402

BOUND_S = 30.0
STEPS_PER_EPOCH = 22  # digits, 2 ranks x 32 images per step


def one_try(workdir: Path, target: str, rng: random.Random) -> tuple[bool, str, float]:
    run_dir = workdir / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_API")}
    env.update({"VITRAIN_LOG_DIR": str(workdir / "logs"), "PYTHONUNBUFFERED": "1"})
    run = DdpRun(
        [
            "experiment=quickstart",
            "strategy=ddp_cpu",
            "trainer.max_epochs=5",
            "logger=csv",
            "trainer.enable_progress_bar=false",
            f"hydra.run.dir={run_dir}",
        ],
        workdir,
        env,
    )
    ranks = run.ranks()
    last = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 180
    while not last.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(rng.uniform(0.0, 3.0))
    sent = time.time()
    for rank in (0, 1) if target == "both" else (int(target[-1]),):
        os.kill(ranks[rank], signal.SIGTERM)
    try:
        exits = run.wait(timeout=BOUND_S + 60)
    except AssertionError as hung:
        return False, str(hung).splitlines()[0], float("inf")
    took = max(exits[pid]["exited_at"] for pid in ranks.values()) - sent
    codes = [exits[pid]["code"] for pid in ranks.values()]
    step = torch.load(last, map_location="cpu", weights_only=False)["global_step"]
    saved = last.stat().st_mtime >= sent and step > STEPS_PER_EPOCH
    leftovers = list((run_dir / "checkpoints").glob(".*tmp*"))
    ok = codes == [143, 143] and took < BOUND_S and saved and not leftovers
    return ok, f"exit codes {codes}, saved step {step}, last rank out after {took:.1f} s", took


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tries", type=int, default=20, help="per target (default 20)")
    parser.add_argument("--targets", nargs="+", default=["rank0", "rank1", "both"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    results: dict[str, list[tuple[bool, float]]] = {target: [] for target in args.targets}
    for number in range(args.tries):
        for target in args.targets:
            workdir = Path(tempfile.mkdtemp(prefix=f"preempt-{target}-"))
            ok, line, took = one_try(workdir, target, rng)
            results[target].append((ok, took))
            print(f"try {number + 1:2d} {target:5s} {'ok  ' if ok else 'FAIL'} {line}", flush=True)
            if ok:
                shutil.rmtree(workdir, ignore_errors=True)
            else:
                print(f"  kept {workdir}", flush=True)
    failed = 0
    for target, runs in results.items():
        good = sum(ok for ok, _ in runs)
        failed += len(runs) - good
        slowest = max(took for _, took in runs)
        print(f"{target}: {good} of {len(runs)} ok; slowest exit {slowest:.1f} s after the signal")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
