"""Compute speed: no host reads in the training step, speed switches, checkpoints with and without
torch.compile, the batch-size finder, and bench/throughput.py (vit_micro, 32 px, CPU)."""

import collections
import csv
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from conftest import ROOT, compose_config, requires_gpu, run_train
from lightning.pytorch.callbacks import TQDMProgressBar

import vitrain.train
from vitrain.errors import UserError
from vitrain.models import ViTClassifier, create_vit
from vitrain.perf import SpeedMonitor, cpu_memory
from vitrain.runtime import compile_mode
from vitrain.train import build_callbacks, build_module
from vitrain.tune import PerDeviceBatchSizeFinder

LOG_EVERY = 4
MICRO = [
    "experiment=quickstart",
    "data=synthetic",
    "data.image_size=32",
    "data.num_classes=10",
    "data.batch_size=16",
    "data.val_batches=1",
    "trainer.max_epochs=1",
    "trainer.accelerator=cpu",
    f"trainer.log_every_n_steps={LOG_EVERY}",
]
# What reads a tensor's value on the host: on a GPU each one waits for the device to finish.
HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """vit_micro's small matmuls gain little from 2 threads, and with another process busy on
    this 2-core machine 2 OpenMP threads run 10x slower than 1."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class HostReads(pl.Callback):
    """Which training batch each host read of a tensor happens in (None: outside the steps).

    A batch's interval runs from its on_train_batch_start to the next one, so it holds the
    step, backward, optimizer, scheduler, every callback and Lightning's logging of that batch.
    """

    def __init__(self) -> None:
        self.batch: int | None = None
        self.reads: dict[int, list[str]] = collections.defaultdict(list)

    def record(self, name: str) -> None:
        if self.batch is not None:
            caller = traceback.extract_stack(limit=4)[0]
            self.reads[self.batch].append(f"{name} at {caller.filename}:{caller.lineno}")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batch = batch_idx

    def on_validation_start(self, trainer, pl_module):
        self.batch = None

    def on_train_epoch_end(self, trainer, pl_module):
        self.batch = None


def watch_host_reads(monkeypatch, probe: HostReads) -> None:
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def patched(self, *args, __original=original, __name=name, **kwargs):
            probe.record(__name)
            return __original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, patched)


@pytest.mark.parametrize("careless", [False, True], ids=["vitrain", "with-item-in-step"])
def test_training_step_reads_the_host_only_at_logging_steps(careless, tmp_path, monkeypatch):
    """Every default callback, the CSV logger, the progress bar and mixup/cutmix on: values
    reach the host only at the log_every_n_steps batches. The second case adds one `.item()` to
    training_step and shows that the probe catches it."""
    if careless:
        step = ViTClassifier.training_step

        def training_step(self, batch, batch_idx):
            loss = step(self, batch, batch_idx)
            print(f"loss {loss.item():.3f}")  # the edit this test exists to catch
            return loss

        monkeypatch.setattr(ViTClassifier, "training_step", training_step)
    probe = HostReads()
    watch_host_reads(monkeypatch, probe)
    batches = 10
    run_train(
        [
            *MICRO,
            f"data.train_batches={batches}",
            "logger=csv",
            "callbacks=default",
            "recipe.mixup_alpha=0.8",
            "recipe.cutmix_alpha=1.0",
            # As on a GPU (recipe.fused=null there): the step count stays on the device. The
            # for-loop AdamW keeps it in a host tensor and reads it with .item(), which on a
            # GPU is no sync, but which this CPU probe cannot tell from one.
            "recipe.fused=true",
        ],
        tmp_path,
        callbacks=[probe],  # first in line, before SpeedMonitor & co
    )
    logging_batches = {b for b in range(batches) if (b + 1) % LOG_EVERY == 0}
    assert logging_batches <= set(probe.reads)  # the probe sees Lightning's logging reads
    between = {b: reads for b, reads in probe.reads.items() if b not in logging_batches}
    if careless:
        assert set(between) == set(range(batches)) - logging_batches
    else:
        assert not between, f"host reads inside training steps: {dict(between)}"
        # ...and what is logged is still all there: the step loss at every logging step, the
        # epoch mean once.
        with open(next(tmp_path.rglob("metrics.csv"))) as f:
            rows = list(csv.DictReader(f))
        assert [int(r["step"]) for r in rows if r.get("train/loss")] == sorted(logging_batches)
        assert len([r for r in rows if r.get("train/loss_epoch")]) == 1


class SyncDebug(pl.Callback):
    """torch.cuda sync debug mode 'error' over every batch after the first two, except the
    logging batches: any host-device synchronisation there raises."""

    def __init__(self, log_every: int, warmup: int = 2) -> None:
        self.log_every, self.warmup, self.checked = log_every, warmup, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        logs = (batch_idx + 1) % self.log_every == 0
        checked = batch_idx >= self.warmup and not logs
        torch.cuda.set_sync_debug_mode("error" if checked else "default")
        self.checked += checked

    def on_train_epoch_end(self, trainer, pl_module):
        torch.cuda.set_sync_debug_mode("default")

    on_validation_start = on_train_epoch_end


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize(
    "precision, compile",
    [("16-mixed", "false"), ("bf16-mixed", "false"), ("bf16-mixed", "default")],
)
def test_training_step_never_synchronises_with_the_gpu(precision, compile, tmp_path, monkeypatch):
    probe = SyncDebug(LOG_EVERY)
    try:
        run_train(
            [
                *[o for o in MICRO if not o.startswith("trainer.accelerator")],
                "trainer.accelerator=cuda",
                "trainer.devices=1",
                f"trainer.precision={precision}",
                f"runtime.compile={compile}",  # eager, and inductor's compiled step
                "data.train_batches=10",
                "logger=csv",
                "callbacks=default",
                "recipe.mixup_alpha=0.8",
                "recipe.cutmix_alpha=1.0",
            ],
            tmp_path,
            callbacks=[probe],
        )
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert probe.checked == 10 - 2 - 2  # batches 2..9 less the logging ones (3, 7)


@pytest.mark.gpu
@requires_gpu
def test_cuda_graph_compile_trains_and_validates_under_lightning(tmp_path):
    """compile=reduce-overhead records CUDA graphs (inductor's cudagraph trees): a fit with the
    sanity check, validation between epochs and a checkpoint, on the GPU, ends with finite
    figures. (Lightning validates under no_grad during fit, so pytorch#135892, CUDA graphs
    compiled under inference_mode and then trained, does not arise.)"""
    metrics = run_train(
        [
            *[o for o in MICRO if not o.startswith("trainer.accelerator")],
            "trainer.accelerator=cuda",
            "trainer.devices=1",
            "trainer.precision=bf16-mixed",
            "runtime.compile=reduce-overhead",
            "data.train_batches=6",
            "trainer.max_epochs=2",
            "logger=csv",
        ],
        tmp_path,
    )
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    assert 0.0 <= metrics["val/acc1"] <= 1.0
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()


# --- speed switches -------------------------------------------------------------------------


def test_compile_values_name_torch_compile_modes():
    assert [compile_mode(v) for v in (False, None, "off", "false")] == [None] * 4
    assert compile_mode(True) == compile_mode("true") == "default"
    assert compile_mode("max-autotune") == "max-autotune"
    assert compile_mode("auto", "cpu") is None
    assert compile_mode("auto", "gpu") == compile_mode("auto", "cuda") == "default"
    assert compile_mode("auto", "auto") == ("default" if torch.cuda.is_available() else None)
    with pytest.raises(UserError, match="runtime.compile=fast is not one of auto, off, default"):
        compile_mode("fast")


def test_compile_mode_reaches_module_compile(monkeypatch):
    modes = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: modes.append(kw["mode"]))
    for value in ("off", "max-autotune", "true", "auto"):  # auto: MICRO trains on the CPU
        build_module(compose_config([*MICRO, f"runtime.compile={value}"]))
    assert modes == ["max-autotune", "default"]


def test_fused_attention_switch_sets_every_block_and_keeps_the_math():
    cfg = compose_config([*MICRO, "model.fused_attn=false"])
    torch.manual_seed(0)
    explicit = create_vit(**cfg.model)
    fused = create_vit(**{**cfg.model, "fused_attn": True})
    fused.load_state_dict(explicit.state_dict())
    blocks = [m for m in explicit.modules() if hasattr(m, "fused_attn")]
    assert len(blocks) == 4 and not any(m.fused_attn for m in blocks)
    assert all(m.fused_attn for m in fused.modules() if hasattr(m, "fused_attn"))
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(explicit(images), fused(images), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("grad_ckpt", [False, True], ids=["plain", "grad-checkpointing"])
def test_compiled_vit_is_one_graph_without_breaks(grad_ckpt):
    """A graph break splits the compiled step and often hides a host read (e.g. `.item()`): the
    ViT forward that `compile` compiles must trace whole, in training mode with drop path, under
    autocast, and with timm's gradient checkpointing."""
    cfg = compose_config(
        [*MICRO, "model.drop_path_rate=0.1", f"model.grad_checkpointing={grad_ckpt}"]
    )
    model = create_vit(**cfg.model).train()
    torch._dynamo.reset()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        explained = torch._dynamo.explain(model)(torch.randn(4, 3, 32, 32))
    assert explained.break_reasons == []
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)


def test_cpu_runs_keep_freed_memory_and_gpu_runs_leave_malloc_alone(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(cpu_memory, "keep_freed_memory", lambda: calls.append(1) or True)
    callbacks = build_callbacks(compose_config(MICRO, tmp_path))
    keep = [c for c in callbacks if isinstance(c, cpu_memory.KeepFreedMemory)]
    assert len(keep) == 1
    assert not any(
        isinstance(c, cpu_memory.KeepFreedMemory)
        for c in build_callbacks(
            compose_config([*MICRO, "runtime.cpu_keep_freed_memory=false"], tmp_path)
        )
    )

    class Trainer:
        class strategy:  # noqa: N801
            root_device = torch.device("cpu")

    keep[0].setup(Trainer(), None, "fit")
    Trainer.strategy.root_device = torch.device("cuda", 0)
    keep[0].setup(Trainer(), None, "fit")
    assert calls == [1]  # the CPU run only


def test_progress_bar_redraws_every_n_steps_not_every_step(tmp_path):
    def bars(overrides: list[str]) -> list[int]:
        callbacks = build_callbacks(compose_config([*MICRO, *overrides], tmp_path))
        return [c.refresh_rate for c in callbacks if isinstance(c, TQDMProgressBar)]

    assert bars([]) == [10]
    assert bars(["runtime.progress_bar_refresh_rate=3"]) == [3]
    assert bars(["trainer.enable_progress_bar=false"]) == []  # Lightning refuses a bar then
    assert bars(["callbacks.progress_bar=null"]) == []  # Lightning's own, every step


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_memory_sets_glibc_thresholds():
    assert cpu_memory.keep_freed_memory() is True


@pytest.fixture
def eager_compile(monkeypatch):
    """torch.compile with dynamo's eager backend: the real graph capture, no C++ build."""
    original, calls = torch.compile, []

    def compile_eagerly(model, **kwargs):
        calls.append(kwargs)
        return original(model, backend="eager")

    monkeypatch.setattr(torch, "compile", compile_eagerly)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    return calls


@pytest.mark.parametrize("saved, loaded", [("default", "off"), ("off", "default")])
def test_checkpoints_resume_with_and_without_compile(saved, loaded, tmp_path, eager_compile):
    first = tmp_path / "first"
    run_train([*MICRO, "data.train_batches=2", "logger=none", f"runtime.compile={saved}"], first)
    ckpt = first / "checkpoints" / "last.ckpt"
    # The compiled run did run through dynamo: frames captured into graphs.
    assert bool(eager_compile) == (saved != "off")
    assert (torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0) == (saved != "off")
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    assert not [k for k in state if "_orig_mod" in k]
    # Loaded into a model built the other way, the weights are the saved ones...
    module = ViTClassifier.load_from_checkpoint(ckpt, compile=compile_mode(loaded))
    assert set(module.state_dict()) == set(state)
    torch.testing.assert_close(module.state_dict()["model.head.weight"], state["model.head.weight"])
    # ...and training resumes from them.
    metrics = run_train(
        [
            *MICRO,
            "data.train_batches=2",
            "logger=none",
            f"runtime.compile={loaded}",
            "trainer.max_epochs=2",
            f"ckpt_path={ckpt}",
        ],
        tmp_path / "resumed",
    )
    assert metrics["train/loss"] > 0


def test_checkpoint_of_a_torch_compile_wrapped_model_loads():
    module = build_module(compose_config(MICRO))
    wrapped = {
        k.replace("model.", "model._orig_mod.", 1): v for k, v in module.state_dict().items()
    }
    checkpoint = {"state_dict": dict(wrapped)}
    module.on_load_checkpoint(checkpoint)
    fresh = build_module(compose_config(MICRO))
    fresh.load_state_dict(checkpoint["state_dict"])  # strict: every key found
    torch.testing.assert_close(fresh.model.head.weight, module.model.head.weight)


# --- batch-size finder ------------------------------------------------------------------------


class ModuleOf(pl.Callback):
    """Keeps the LightningModule a run trained."""

    def setup(self, trainer, pl_module, stage):
        self.module = pl_module


def test_batch_size_finder_trains_with_the_batch_it_found(tmp_path, monkeypatch):
    trained = ModuleOf()
    # perf/first_step_s as SpeedMonitor holds it after each step of each fit-loop run.
    first_steps: list[list] = []
    start, end = SpeedMonitor.on_train_start, SpeedMonitor.on_train_batch_end
    monkeypatch.setattr(
        SpeedMonitor,
        "on_train_start",
        lambda self, *a: (start(self, *a), first_steps.append([])),
    )
    monkeypatch.setattr(
        SpeedMonitor,
        "on_train_batch_end",
        lambda self, *a: (end(self, *a), first_steps[-1].append(self.first_step_s)),
    )
    cfg = compose_config(
        [
            *MICRO,
            "data.batch_size=8",
            "data.train_batches=3",
            "logger=none",
            "callbacks=base",
            "tune.batch_size=true",
            "tune.max_trials=3",
            "tune.steps_per_trial=1",
        ],
        tmp_path,
    )
    vitrain.train.train(cfg, callbacks=[trained])
    # 8 -> 16 -> 32: three trials (CPU never runs out of memory; max_trials caps the search).
    # The finder returns its answer; the config stays what the user wrote.
    assert cfg.data.batch_size == 8
    report = json.loads((tmp_path / "run_report.json").read_text())
    assert report["config"]["global_batch"] == 32 and report["config"]["per_device_batch"] == 32
    assert report["config"]["batch_size_found"] == 32
    images_per_epoch = (
        report["epochs"][0]["perf/images_per_s"] * report["epochs"][0]["perf/epoch_time_s"]
    )
    assert images_per_epoch == pytest.approx(3 * 32)
    # Lightning runs the finder's trials without the run's callbacks: the first step that
    # SpeedMonitor times is training's, not a trial's.
    assert len(first_steps) == 1 and len(first_steps[0]) == 3
    assert report["summary"]["first_step_s"] == first_steps[0][0]
    module = trained.module
    assert module.global_batch_size == 32 and module.hparams.global_batch_size == 8
    base_lr = cfg.recipe.base_lr
    assert module.trainer.optimizers[0].param_groups[0]["initial_lr"] == pytest.approx(
        base_lr * 32 / 512
    )


def test_batch_size_finder_trials_run_eagerly_and_training_compiles_once(tmp_path, monkeypatch):
    """With compile on, each trial's batch size would be compiled (and the batch dimension made
    dynamic); the trials run eagerly, and training compiles for the batch found only."""
    batches = []  # the image batch size of every graph dynamo hands to the backend

    def recording_backend(graph, example_inputs):
        tensors = [x for x in example_inputs if isinstance(x, torch.Tensor)]
        batches.extend(x.shape[0] for x in tensors if x.shape[1:] == (3, 32, 32))
        return graph.forward

    original = torch.compile
    monkeypatch.setattr(
        torch, "compile", lambda model, **kw: original(model, backend=recording_backend)
    )
    run = [*MICRO, "data.train_batches=3", "logger=none", "callbacks=base"]
    run.append("runtime.compile=default")
    torch._dynamo.reset()
    run_train(run, tmp_path / "plain")
    assert set(batches) == {16}  # MICRO's batch: the recording sees what was compiled
    torch._dynamo.reset()
    batches.clear()
    tuned = ["data.batch_size=8", "tune.batch_size=true", "tune.max_trials=3"]
    run_train([*run, *tuned, "tune.steps_per_trial=1"], tmp_path / "tuned")
    # 8 -> 16 -> 32 were tried, eagerly; training (and validation) compiled for 32 alone.
    assert set(batches) == {32}


def test_synthetic_loader_allocates_at_its_first_batch_not_when_built(monkeypatch):
    # The finder builds the next loader while the failed trial's OOM still holds its memory
    # (seen on an H200: vit_b16 found 2048, then the loader's own allocation ran out).
    from vitrain.data.synthetic import SyntheticDataModule

    made = []
    randn = torch.randn
    monkeypatch.setattr(torch, "randn", lambda *a, **k: made.append(a) or randn(*a, **k))
    loader = SyntheticDataModule(batch_size=4, image_size=8, num_classes=3).train_dataloader()
    assert made == [] and len(loader) == 100
    batches = list(loader) + list(loader)
    assert len(made) == 1  # once, then the same tensors every batch and epoch
    first = batches[0]
    assert all(b.images is first.images and b.targets is first.targets for b in batches)
    assert first.images.shape == (4, 3, 8, 8) and int(first.targets.max()) < 3


def test_batch_size_finder_is_built_only_when_asked_and_refuses_what_it_cannot_do(tmp_path):
    def names(overrides: list[str]) -> list[str]:
        cfg = compose_config([*MICRO, *overrides], tmp_path)
        return [type(c).__name__ for c in build_callbacks(cfg)]

    assert "PerDeviceBatchSizeFinder" not in names([])
    assert "PerDeviceBatchSizeFinder" in names(["tune.batch_size=true"])
    with pytest.raises(UserError, match="a resumed run keeps the batch"):
        names(["tune.batch_size=true", "ckpt_path=/x/last.ckpt"])
    with pytest.raises(UserError, match="tune.mode=fast is not one of power, binsearch"):
        names(["tune.batch_size=true", "tune.mode=fast"])
    # The finder reads whether the module mixes images when the run starts; it sets nothing.
    cfg = compose_config([*MICRO, "recipe.mixup_alpha=0.8"], tmp_path)
    finder = PerDeviceBatchSizeFinder(mode="binsearch")

    class Trainer:
        world_size = 1

    with pytest.raises(UserError, match="tune.mode=binsearch tries odd batch sizes"):
        finder.setup(Trainer(), build_module(cfg), "fit")


def test_batch_size_finder_refuses_several_devices():
    finder = PerDeviceBatchSizeFinder()

    class Trainer:
        world_size = 8

    with pytest.raises(UserError, match="runs on one device, this run has 8"):
        finder.setup(Trainer(), None, "fit")


# --- the benchmark ----------------------------------------------------------------------------


def test_throughput_bench_pools_processes_into_one_table_with_the_ratio(tmp_path):
    out = tmp_path / "bench.json"
    argv = "--repeats 1 --processes 2 --warmup 2 --steps 3 --batch 8 --fused-attn on,off"
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "throughput.py"), *argv.split()]
        + ["--threads", "1", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("| vit_micro")]
    assert len(lines) == 2  # one row per value of the swept switch
    assert "torch 2." in result.stdout and "lightning 2." in result.stdout
    rows = json.loads(out.read_text())["rows"]
    assert [row["fused_attn"] for row in rows] == ["on", "off"]
    for row, line in zip(rows, lines, strict=True):
        assert len(row["vitrain"]) == len(row["raw"]) == 2  # 1 repeat from each process
        # The 2 warm-up steps, timed from the start of training (compile would be in them).
        assert all(run["warmup_seconds"] > 0 for run in row["vitrain"] + row["raw"])
        a, b = row["vitrain_summary"], row["raw_summary"]
        assert a["images_per_s"] > 0 and b["images_per_s"] > 0
        assert row["ratio"] == pytest.approx(a["images_per_s"] / b["images_per_s"])
        assert f"| {row['ratio']:.3f} |" in line


@pytest.fixture
def throughput():
    """bench/throughput.py as a module."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import throughput

        return throughput
    finally:
        sys.path.remove(str(ROOT / "bench"))


def test_throughput_bench_cold_cache_is_empty_per_configuration(throughput):
    before = {k: os.environ.get(k) for k in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    seen = []
    for _ in range(2):
        with throughput.cold_inductor_cache():
            cache = Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
            assert not any(cache.iterdir())
            assert Path(os.environ["TRITON_CACHE_DIR"]).parent == cache
            (cache / "compiled").write_text("kernels")  # what a compile would leave
            seen.append(cache)
    assert seen[0] != seen[1]  # the second configuration does not see the first's kernels
    assert not seen[0].exists()  # removed afterwards
    assert {k: os.environ.get(k) for k in before} == before


def test_throughput_bench_says_when_compile_pays_for_its_warm_up(throughput):
    def row(compile, warmup_s, step_ms, model="vit_b16"):
        summary = {"warmup_s": warmup_s, "step_ms": step_ms}
        return {"model": model, "batch": 256, "precisions": "bf16-mixed", "compile": compile,
                "vitrain_summary": summary}  # fmt: skip

    rows = [
        row("off", 2.0, 100.0),
        row("default", 62.0, 75.0),  # +60 s once, -25 ms per step: 2,400 steps
        row("max-autotune", 302.0, 110.0),  # slower per step: never pays
        row("default", 50.0, 10.0, model="vit_s16"),  # no eager row to compare with
    ]
    lines = throughput.compile_break_even(rows)
    assert lines == [
        "compile=default (vit_b16, bf16-mixed, batch 256): warm-up +60.0 s, step -25.0 ms: "
        "pays for itself after 2,400 steps",
        "compile=max-autotune (vit_b16, bf16-mixed, batch 256): no faster per step "
        "(-10.0 ms saved); never pays",
    ]
