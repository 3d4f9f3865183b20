"""hparams_search=optuna_deit (README "Sweeps")."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, compose_config, run_cli
from omegaconf import OmegaConf

optuna = pytest.importorskip("optuna", reason="needs the sweeps extra: pip install -e .[dev]")

from hydra_plugins.vitrain_sweeps.optuna_sweeper import resume_study  # noqa: E402

# One epoch of a few batches: each trial or job takes seconds on a CPU.
SHORT = [
    "experiment=quickstart",
    "logger=csv",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=4",
    "trainer.limit_val_batches=2",
    "trainer.enable_progress_bar=false",
    "data.num_workers=0",
]
SEARCHED = ("recipe.base_lr", "recipe.weight_decay", "model.drop_path_rate", "recipe.mixup_alpha")


def compose_with_hydra(overrides: list[str]):
    """The config with its hydra node (sweeper, launcher), as a multirun composes it."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=True)


def instantiate_plugin(cfg, kind: str):
    """The sweeper or launcher as Hydra itself builds it (plugins only from hydra_plugins.*)."""
    from hydra.core.plugins import Plugins
    from hydra.types import HydraContext

    context = HydraContext(config_loader=None, callbacks=None)
    make = getattr(Plugins.instance(), f"instantiate_{kind}")
    return make(hydra_context=context, task_function=lambda cfg: None, config=cfg)


# --- hparams_search=optuna_deit ---------------------------------------------------------------


def test_optuna_search_config(tmp_path):
    from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides
    from optuna.distributions import LogUniformDistribution, UniformDistribution

    cfg = compose_with_hydra(["hparams_search=optuna_deit", f"hydra.sweep.dir={tmp_path}"])
    sweeper = cfg.hydra.sweeper
    assert cfg.hydra.mode.name == "MULTIRUN"  # no -m needed
    assert sweeper.direction == "maximize" and sweeper.study_name == "optuna_deit"
    assert sweeper.storage == f"sqlite:///{tmp_path}/optuna.db"  # in the sweep directory
    assert sweeper.sampler._target_ == "optuna.samplers.TPESampler"
    assert type(instantiate_plugin(cfg, "sweeper")).__module__.startswith("hydra_plugins.vitrain")
    # The plugin's own parser turns the search space into Optuna distributions.
    space, fixed = create_params_from_overrides([f"{k}={v}" for k, v in sweeper.params.items()])
    assert not fixed and sorted(space) == sorted(SEARCHED)
    assert isinstance(space["recipe.base_lr"], LogUniformDistribution)
    assert isinstance(space["recipe.weight_decay"], LogUniformDistribution)
    assert isinstance(space["model.drop_path_rate"], UniformDistribution)
    assert isinstance(space["recipe.mixup_alpha"], UniformDistribution)
    # Every searched key exists in the task config, and DeiT's own value lies in its range.
    deit = compose_config(["model=vit_b16"])
    for key, dist in space.items():
        assert dist.low <= OmegaConf.select(deit, key, throw_on_missing=True) <= dist.high, key


def test_resume_study_counts_completed_trials_and_fails_interrupted_ones(tmp_path):
    storage = f"sqlite:///{tmp_path}/optuna.db"
    assert resume_study(storage, "s") == (0, 0)  # no study yet
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    for value in (0.1, 0.2):
        study.tell(study.ask(), value)
    study.ask()  # left RUNNING, as by a killed search
    assert resume_study(storage, "s") == (2, 3)
    states = [t.state.name for t in optuna.load_study(study_name="s", storage=storage).trials]
    assert states == ["COMPLETE", "COMPLETE", "FAIL"]


def argv_probe(tmp_path) -> tuple[dict, Path]:
    """A sitecustomize that records the command line of every DDP child Lightning starts."""
    probe = tmp_path / "probe"
    probe.mkdir()
    (probe / "sitecustomize.py").write_text(
        "import json, os, sys\n"
        "if os.environ.get('LOCAL_RANK') and os.environ.get('ARGV_LOG'):\n"
        "    with open(os.environ['ARGV_LOG'], 'a') as f:\n"
        "        f.write(json.dumps(sys.argv) + '\\n')\n"
    )
    log = tmp_path / "children.jsonl"
    path = os.pathsep.join(filter(None, [str(probe), os.environ.get("PYTHONPATH")]))
    return {"PYTHONPATH": path, "ARGV_LOG": str(log)}, log


@pytest.mark.slow
def test_optuna_search_with_ddp_resumes_after_interruption(tmp_path):
    """Trials of the quickstart on 2 DDP CPU processes; the search is killed during its second
    trial, and the same command continues the study in the same sweep directory."""
    sweep = tmp_path / "sweep"
    args = [
        "hparams_search=optuna_deit",
        *SHORT,
        "strategy=ddp_cpu",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.sampler.n_startup_trials=1",  # trial 2 comes from TPE's model
        f"hydra.sweep.dir={sweep}",
    ]
    env, children = argv_probe(tmp_path)

    # First invocation: killed (SIGKILL, everything at once) as soon as trial 1 has started.
    child_env = {**os.environ, **env, "VITRAIN_LOG_DIR": str(tmp_path / "logs")}
    first = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=tmp_path,
        env=child_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while not (sweep / "1" / ".hydra").exists():
        if first.poll() is not None or time.monotonic() > deadline:
            os.killpg(first.pid, signal.SIGKILL)
            pytest.fail(f"trial 1 never started (exit code {first.returncode})")
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(timeout=60)
    assert (sweep / "0" / "run_report.json").exists() and not (sweep / "2").exists()

    second = run_cli(args, tmp_path, env=env)
    assert second.returncode == 0, second.stderr[-3000:]
    study = optuna.load_study(study_name="optuna_deit", storage=f"sqlite:///{sweep}/optuna.db")
    assert [(t.number, t.state.name) for t in study.trials] == [
        (0, "COMPLETE"),
        (1, "FAIL"),  # interrupted, not started over: trial 2 is new, in its own directory
        (2, "COMPLETE"),
    ]
    assert not (sweep / "1" / "run_report.json").exists()
    assert not (tmp_path / "logs").exists()  # no stray runs or searches anywhere else

    recorded = [json.loads(line) for line in children.read_text().splitlines()]
    for trial in (study.trials[0], study.trials[2]):
        job = sweep / str(trial.number)
        overrides = [f"{k}={v}" for k, v in trial.params.items()]
        report = json.loads((job / "run_report.json").read_text())
        assert report["run"]["status"] == "finished" and report["config"]["devices"] == 2
        assert set(overrides) <= set(report["overrides"])  # rank 0 trained the trial's values
        assert report["summary"]["best_val_acc1"] == pytest.approx(trial.value)
        # ... and so did rank 1: one child per trial, this trial's values, its directory, no sweep
        (argv,) = [a for a in recorded if f'hydra.run.dir="{job}"' in a]
        assert set(overrides) <= set(argv) and "hydra.mode=RUN" in argv
        assert "-m" not in argv and "--multirun" not in argv
    # Trial 1 was killed before or after it started its child; no child ran anywhere else.
    run_dirs = {x for argv in recorded for x in argv if x.startswith("hydra.run.dir=")}
    assert run_dirs <= {f'hydra.run.dir="{sweep / str(n)}"' for n in (0, 1, 2)}

    best = OmegaConf.load(sweep / "optimization_results.yaml")
    assert best.best_value == pytest.approx(study.best_value)
    table = subprocess.run(
        [sys.executable, "-m", "vitrain.report", str(sweep)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rows = [line for line in table.splitlines() if line.startswith("| sweep/")]
    assert [row.split(" | ")[0] for row in rows] == ["| sweep/0", "| sweep/2"]
    for row, trial in zip(rows, (study.trials[0], study.trials[2]), strict=True):
        assert f"| {100 * trial.value:.2f} |" in row  # best val/acc1, as the study saw it
