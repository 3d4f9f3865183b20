"""Training-step throughput: vitrain's Lightning step against a hand-written PyTorch loop.

For each combination of the swept settings, on one device and random on-device batches:

(a) vitrain: `vitrain.train.train` on the config `python train.py` composes from the same
    overrides (data=synthetic, logger=csv, callbacks=base, no validation), timed by
    vitrain.perf.window.StepWindow from the start of batch `warmup` to the start of batch
    `warmup + steps`: whole iterations of Lightning's loop, device synchronised at both ends;
(b) raw: a plain loop with the same model (create_vit from the same config), the same timm
    AdamW parameter groups and cosine schedule stepped per update, the same mixup/cutmix and
    loss, the same precision (torch.autocast; a GradScaler for fp16) and the same compile mode,
    timed the same way.

(a) and (b) alternate (a b b a ...) for --repeats rounds, in each of --processes fresh processes
(on a CPU the same kernels run a few % faster or slower from one process to the next); the table
gives the medians of all runs and the ratio (a)/(b) of the median images/s. MFU uses
vitrain.perf.flops and vitrain.perf.peaks; peak memory is torch.cuda.max_memory_allocated.

    python bench/throughput.py --processes 4 --threads 1       # CPU: vit_micro, 32 px, batch 64
    python bench/throughput.py --models vit_s16,vit_b16,vit_l16 --batch 256 \\
        --precisions 16-mixed,bf16-mixed --compile off,default      # the README GPU table
    python bench/throughput.py --fused-adamw off,on --fused-attn off,on --repeats 7
"""

import argparse
import contextlib
import gc
import itertools
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from omegaconf import OmegaConf
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler

sys.path.insert(0, str(Path(__file__).parent))
from common import compose_config, machine_header, quiet_lightning  # noqa: E402

from vitrain.errors import UserError  # noqa: E402
from vitrain.models import create_vit  # noqa: E402
from vitrain.models.recipe import learning_rate, training_loss  # noqa: E402
from vitrain.perf.cpu_memory import keep_freed_memory  # noqa: E402
from vitrain.perf.flops import training_flops_per_image  # noqa: E402
from vitrain.perf.peaks import compute_dtype, peak_flops  # noqa: E402
from vitrain.perf.window import StepWindow  # noqa: E402
from vitrain.runtime import accelerator_is_cuda, compile_mode  # noqa: E402
from vitrain.train import train  # noqa: E402

ON_OFF = {"on": "true", "off": "false", "auto": "null"}
# Swept settings: command-line flag -> (config key, how a value is written, default).
SWITCHES = {
    "precisions": ("trainer.precision", str, "32-true"),
    "compile": ("runtime.compile", lambda v: "false" if v == "off" else v, "off"),
    "fused_adamw": ("recipe.fused", ON_OFF.__getitem__, "auto"),
    "fused_attn": ("model.fused_attn", ON_OFF.__getitem__, "on"),
    "grad_ckpt": ("model.grad_checkpointing", ON_OFF.__getitem__, "off"),
    "matmul": ("runtime.float32_matmul_precision", str, "high"),
}
RAW_PRECISIONS = {
    "32-true": None,
    "32": None,
    "bf16-mixed": torch.bfloat16,
    "16-mixed": torch.float16,
}


def sync(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def fresh_device(device: torch.device, compiled: bool) -> None:
    """Each run starts alone: no memory of the previous one, no compiled code of its model."""
    gc.collect()
    if compiled:
        torch._dynamo.reset()  # else a sweep's many models exhaust dynamo's recompile limit
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def run_vitrain(cfg, warmup: int, steps: int, out: Path, device: torch.device) -> dict:
    """(a): the whole of vitrain.train.train, timed over batches [warmup, warmup + steps)."""
    window = out / "window.json"
    fresh_device(device, compiled=bool(compile_mode(cfg.runtime.compile, cfg.trainer.accelerator)))
    with open(out / "train.log", "w") as log:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            train(cfg, callbacks=[StepWindow(warmup, warmup + steps, str(window))])
    timed = json.loads(window.read_text())
    return {
        "seconds": timed["seconds"],
        "images": timed["images"],
        "warmup_seconds": timed["warmup_seconds"],
        "peak_gib": peak_gib(device),
    }


def run_raw(cfg, warmup: int, steps: int, device: torch.device) -> dict:
    """(b): the same training step written by hand, in plain PyTorch."""
    precision = str(cfg.trainer.precision)
    if precision not in RAW_PRECISIONS:
        raise UserError(f"the raw loop runs 32-true, 16-mixed and bf16-mixed, not {precision}")
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    recipe = OmegaConf.to_container(cfg.recipe, resolve=True)
    mode = compile_mode(cfg.runtime.compile, cfg.trainer.accelerator)
    fresh_device(device, compiled=bool(mode))
    if cfg.runtime.cpu_keep_freed_memory and device.type == "cpu":
        keep_freed_memory()  # what (a) does on a CPU: the same allocator for both loops
    torch.manual_seed(cfg.seed)
    model = create_vit(**model_cfg).to(device).train()
    if mode:
        model.compile(mode=mode)
    fused = recipe["fused"] if recipe["fused"] is not None else device.type == "cuda"
    batch, size = cfg.data.batch_size, cfg.data.image_size
    optimizer = create_optimizer_v2(
        model,
        opt=recipe["optimizer"],
        lr=learning_rate(recipe, batch),
        weight_decay=recipe["weight_decay"],
        layer_decay=recipe["layer_decay"],
        betas=tuple(recipe["betas"]),
        eps=recipe["eps"],
        **({"fused": True} if fused else {}),
    )
    scheduler = CosineLRScheduler(
        optimizer, t_initial=warmup + steps, lr_min=recipe["min_lr"], t_in_epochs=False
    )
    mixup, criterion = training_loss(recipe, model_cfg["num_classes"])
    dtype = RAW_PRECISIONS[precision]
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    images = torch.randn(batch, 3, size, size, device=device)
    targets = torch.randint(0, model_cfg["num_classes"], (batch,), device=device)

    loop_start = start = sync(device)
    for step in range(warmup + steps):
        if step == warmup:
            start = sync(device)
        x, y = mixup(images, targets) if mixup is not None else (images, targets)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype) if dtype else nullcontext():
            loss = criterion(model(x), y)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        scheduler.step_update(num_updates=step + 1)
    seconds = sync(device) - start
    return {
        "seconds": seconds,
        "images": batch * steps,
        "warmup_seconds": start - loop_start,
        "peak_gib": peak_gib(device),
    }


def overrides_for(args, model: str, batch: int, switches: dict) -> list[str]:
    size = args.image_size or (32 if model == "vit_micro" else 224)
    out = [
        f"model={model}",
        "data=synthetic",
        f"data.image_size={size}",
        f"data.num_classes={args.num_classes}",
        f"data.batch_size={batch}",  # one device: the global batch is the per-device batch
        f"data.train_batches={args.warmup + args.steps + 1}",
        "data.val_batches=1",
        "trainer.max_epochs=1",
        "trainer.limit_val_batches=0",
        "trainer.num_sanity_val_steps=0",
        "trainer.devices=1",
        f"trainer.accelerator={args.accelerator}",
        f"logger={args.logger}",
        "callbacks=base",
        "resume=never",
    ]
    for flag, value in switches.items():
        key, write, _ = SWITCHES[flag]
        out.append(f"{key}={write(value)}")
    return [*out, *args.set]


def device_for(accelerator: str) -> torch.device:
    return torch.device("cuda" if accelerator_is_cuda(accelerator) else "cpu")


def collect(args, model: str, batch: int, switches: dict, root: Path) -> dict:
    """Interleaved repeats of (a) and (b) for one configuration: every run's figures."""
    row = {"model": model, "batch": batch, **switches, "vitrain": [], "raw": []}
    device = device_for(args.accelerator)
    try:
        for repeat in range(args.repeats):
            order = ("vitrain", "raw") if repeat % 2 == 0 else ("raw", "vitrain")
            for side in order:
                out = Path(tempfile.mkdtemp(prefix=f"{side}-", dir=root))
                cfg = compose_config(overrides_for(args, model, batch, switches), out)
                if side == "vitrain":
                    row[side].append(run_vitrain(cfg, args.warmup, args.steps, out, device))
                else:
                    row[side].append(run_raw(cfg, args.warmup, args.steps, device))
    except UserError as err:
        return {**row, "error": str(err)}
    row["image_size"] = cfg.data.image_size
    row["flops_per_image"] = training_flops_per_image(
        OmegaConf.to_container(cfg.model, resolve=True)
    )
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    row["peak_flops"] = peak_flops(device_name, switches["precisions"])
    row["compute_dtype"] = compute_dtype(switches["precisions"])
    return row


def summarize(row: dict, steps: int) -> dict:
    """Medians of the runs (of every process), the ratio of the medians and the paired ratios."""
    if "error" in row:
        return row
    flops, peak = row["flops_per_image"], row["peak_flops"]
    for side in ("vitrain", "raw"):
        runs = row[side]
        rates = [r["images"] / r["seconds"] for r in runs]
        rate = statistics.median(rates)
        peaks = [r["peak_gib"] for r in runs if r["peak_gib"] is not None]
        row[f"{side}_summary"] = {
            "images_per_s": rate,
            "images_per_s_runs": rates,
            "step_ms": statistics.median(r["seconds"] / steps * 1e3 for r in runs),
            # The slowest: a process's first run, the only one that compiles from scratch (later
            # runs reuse the process's compiled kernels), i.e. what a training run pays.
            "warmup_s": max(r["warmup_seconds"] for r in runs),
            "tflops": flops * rate / 1e12,
            "mfu": flops * rate / peak if peak else None,
            "peak_gib": max(peaks) if peaks else None,
        }
    a, b = row["vitrain_summary"], row["raw_summary"]
    row["ratio"] = a["images_per_s"] / b["images_per_s"]
    # Each repeat's (a)/(b): paired in time, so a drift in machine load cancels out.
    row["ratio_runs"] = [
        x / y for x, y in zip(a["images_per_s_runs"], b["images_per_s_runs"], strict=True)
    ]
    row["ratio_paired"] = statistics.median(row["ratio_runs"])
    return row


def _fmt(value, spec: str, missing: str = "n/a") -> str:
    return missing if value is None else format(value, spec)


def table(rows: list[dict], varying: list[str]) -> str:
    head = ["model", "px", "batch", *(SWITCHES[k][0] for k in varying)]
    head += ["vitrain img/s", "raw img/s", "(a)/(b)", "vitrain step ms", "raw step ms"]
    head += ["vitrain MFU", "raw MFU", "vitrain TFLOP/s", "vitrain peak GiB", "raw peak GiB"]
    head += ["vitrain warm-up s (max)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"], str(r.get("image_size", "")), str(r["batch"])]
        cells += [str(r[k]) for k in varying]
        if "error" in r:
            cells += [f"skipped: {r['error']}"] + [""] * (len(head) - len(cells) - 1)
        else:
            a, b = r["vitrain_summary"], r["raw_summary"]
            cells += [
                f"{a['images_per_s']:,.0f}",
                f"{b['images_per_s']:,.0f}",
                f"{r['ratio']:.3f}",
                f"{a['step_ms']:.1f}",
                f"{b['step_ms']:.1f}",
                _fmt(a["mfu"], ".1%"),
                _fmt(b["mfu"], ".1%"),
                f"{a['tflops']:.3g}",
                _fmt(a["peak_gib"], ".2f"),
                _fmt(b["peak_gib"], ".2f"),
                f"{a['warmup_s']:.1f}",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compile_break_even(rows: list[dict]) -> list[str]:
    """For each compiled row, the steps after which compiling has paid for its warm-up.

    Compared with the row that differs only in compile=off (vitrain's side): compiling adds
    warm-up seconds once and saves step time on every step after.
    """

    def key(row: dict) -> tuple:
        return tuple((k, v) for k, v in row.items() if k in ("model", "batch", *SWITCHES))

    eager = {
        key({**r, "compile": "off"}): r
        for r in rows
        if r.get("compile") == "off" and "error" not in r
    }
    lines = []
    for row in rows:
        base = eager.get(key({**row, "compile": "off"}))
        if row.get("compile") == "off" or "error" in row or base is None:
            continue
        a, b = row["vitrain_summary"], base["vitrain_summary"]
        extra_s = a["warmup_s"] - b["warmup_s"]
        saved_ms = b["step_ms"] - a["step_ms"]
        what = f"compile={row['compile']} ({row['model']}, {row['precisions']}"
        what += f", batch {row['batch']})"
        if saved_ms <= 0:
            lines.append(f"{what}: no faster per step ({saved_ms:+.1f} ms saved); never pays")
        else:
            steps = max(extra_s, 0.0) / (saved_ms / 1e3)
            lines.append(
                f"{what}: warm-up {extra_s:+.1f} s, step {-saved_ms:+.1f} ms: "
                f"pays for itself after {steps:,.0f} steps"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="vit_micro", help="comma list of conf/model options")
    parser.add_argument("--batch", default="64", help="per-device batch(es), comma list")
    parser.add_argument("--image-size", type=int, default=None, help="default: 32 micro, 224")
    parser.add_argument("--num-classes", type=int, default=1000)
    for flag, (key, _, default) in SWITCHES.items():
        parser.add_argument(
            f"--{flag.replace('_', '-')}", default=default, help=f"{key}, comma list"
        )
    parser.add_argument("--accelerator", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--logger", default="csv", help="logger group option for (a)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps per run")
    parser.add_argument("--steps", type=int, default=50, help="timed steps per run")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved runs of each side")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--set", action="append", default=[], help="extra override, both sides")
    parser.add_argument("--json", type=Path, default=None, help="also write every figure here")
    parser.add_argument(
        "--processes", type=int, default=1, help="pool the repeats of this many processes"
    )
    parser.add_argument(
        "--cold-cache",
        action="store_true",
        help="each configuration compiles into an empty inductor cache, as on a new machine",
    )
    parser.add_argument("--child-json", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    quiet_lightning()
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)  # "Seed set to ..."
    if args.threads:
        torch.set_num_threads(args.threads)
    sweep = {flag: getattr(args, flag).split(",") for flag in SWITCHES}
    varying = [flag for flag, values in sweep.items() if len(values) > 1]
    models, batches = args.models.split(","), [int(b) for b in args.batch.split(",")]
    print(machine_header())
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(
        f"load average at start: {load[0]:.2f} | torch threads: {torch.get_num_threads()}"
        if load
        else f"torch threads: {torch.get_num_threads()}"
    )
    fixed = ", ".join(
        f"{SWITCHES[f][0]}={SWITCHES[f][1](v[0])}" for f, v in sweep.items() if f not in varying
    )
    print(
        f"{args.repeats} interleaved repeats x {args.processes} process(es) of {args.warmup} "
        f"warm-up + {args.steps} timed steps; medians. "
        f"Fixed: {fixed}{'; ' + ' '.join(args.set) if args.set else ''}",
        flush=True,
    )
    configs = list(itertools.product(models, batches, *sweep.values()))
    if args.processes > 1:
        rows = pooled_from_processes(args, len(configs))
    else:
        rows = []
        with tempfile.TemporaryDirectory(prefix="vitrain-throughput-") as tmp:
            for model, batch, *values in configs:
                switches = dict(zip(sweep, values, strict=True))
                with cold_inductor_cache() if args.cold_cache else nullcontext():
                    rows.append(collect(args, model, batch, switches, Path(tmp)))
                report_progress(rows[-1], args.steps)
    if args.child_json:  # one of --processes: the parent pools and prints
        args.child_json.write_text(json.dumps(rows))
        return
    rows = [summarize(row, args.steps) for row in rows]
    print()
    print(table(rows, varying))
    for line in compile_break_even(rows):
        print(line)
    if args.json:
        args.json.write_text(
            json.dumps(
                {"header": machine_header(), "args": vars(args), "rows": rows},
                indent=1,
                default=str,
            )
        )


@contextlib.contextmanager
def cold_inductor_cache():
    """An empty inductor and Triton cache (on disk and in this process) for one configuration's
    runs: its first run compiles from scratch, as on a new machine, whatever the configurations
    before it compiled. (Later runs of the configuration reuse what the first one compiled.)
    torch's fresh_inductor_cache, the name it has kept since torch 2.1; deleted afterwards."""
    from torch._inductor.utils import fresh_inductor_cache

    with fresh_inductor_cache():
        yield


def report_progress(row: dict, steps: int) -> None:
    if "error" not in row:
        ratios = summarize(dict(row), steps)["ratio_runs"]
        print(
            f"  {row['model']} batch {row['batch']}: (a)/(b) per repeat "
            + " ".join(f"{x:.3f}" for x in ratios),
            file=sys.stderr,
            flush=True,
        )


def pooled_from_processes(args, n_configs: int) -> list[dict]:
    """Run the sweep in --processes fresh processes, one after the other, and pool their runs.

    On a CPU the speed of the same kernels differs by a few % from one process to the next
    (memory layout, where the process runs), while (a) and (b) share each process: pooling
    the repeats of several processes keeps that out of the ratio.
    """
    argv, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
            continue
        if arg in ("--processes", "--json"):
            skip = True
            continue
        if arg.startswith(("--processes=", "--json=")):
            continue
        argv.append(arg)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="vitrain-throughput-") as tmp:
        for i in range(args.processes):
            out = Path(tmp) / f"process{i}.json"
            cmd = [sys.executable, __file__, *argv, "--child-json", str(out)]
            done = subprocess.run(cmd, stdout=subprocess.DEVNULL)
            if done.returncode:
                raise SystemExit(f"process {i} of --processes failed: {' '.join(cmd)}")
            for index, row in enumerate(json.loads(out.read_text())):
                if i == 0:
                    rows.append(row)
                elif "error" not in row:
                    rows[index]["vitrain"] += row["vitrain"]
                    rows[index]["raw"] += row["raw"]
    assert len(rows) == n_configs
    return rows


if __name__ == "__main__":
    main()
