"""hparams_search=optuna_deit and the submitit launchers (README "Sweeps")."""

import inspect
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, compose_config, run_cli
from omegaconf import OmegaConf

from vitrain.report import setting_text

optuna = pytest.importorskip("optuna", reason="needs the sweeps extra: pip install -e .[dev]")
submitit = pytest.importorskip("submitit", reason="needs the sweeps extra: pip install -e .[dev]")

from hydra_plugins.vitrain_sweeps.optuna_sweeper import resume_study  # noqa: E402
from hydra_plugins.vitrain_sweeps.submitit_launcher import job_gpus  # noqa: E402

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


def trials_of(sweep: Path) -> list[tuple[int, str, dict]]:
    study = optuna.load_study(study_name="optuna_deit", storage=f"sqlite:///{sweep}/optuna.db")
    return [(t.number, t.state.name, t.params) for t in study.trials]


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.mark.slow
def test_a_trial_that_fails_is_marked_failed_and_the_search_goes_on(tmp_path):
    """3 trials over a learning rate of 5e-4 or 1e30, whose loss goes NaN: the sampler's seed
    gives 5e-4, 1e30, 5e-4, so the NaN trial comes after one that completed."""
    sweep = tmp_path / "sweep"
    result = run_cli(
        [
            "hparams_search=optuna_deit",
            *SHORT,
            "recipe.base_lr=choice(5e-4,1e30)",  # the search space: this one value
            "recipe.weight_decay=0.05",
            "model.drop_path_rate=0",
            "recipe.mixup_alpha=0",
            "hydra.sweeper.n_trials=3",
            "hydra.sweeper.sampler.seed=10",
            f"hydra.sweep.dir={sweep}",
        ],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert trials_of(sweep) == [
        (0, "COMPLETE", {"recipe.base_lr": 5e-4}),
        (1, "FAIL", {"recipe.base_lr": 1e30}),
        (2, "COMPLETE", {"recipe.base_lr": 5e-4}),
    ]
    (nan,) = error_lines(result.stderr)  # train.py's line for trial 1, and no other
    assert nan.startswith("error: train/loss became NaN")
    warning = f"Trial 1 failed (recipe.base_lr=1e30) in {sweep / '1'}: {nan[len('error: ') :]}"
    assert warning in result.stdout and "the search goes on" in result.stdout
    # Trial 1 trained until its loss went NaN: its report says so.
    assert json.loads((sweep / "1/run_report.json").read_text())["run"]["status"] == "failed"
    # The failed trial does not count: a rerun would run one more to reach 3 completed.
    assert resume_study(f"sqlite:///{sweep}/optuna.db", "optuna_deit") == (2, 3)
    assert OmegaConf.load(sweep / "optimization_results.yaml").best_params == {
        "recipe.base_lr": 5e-4
    }


@pytest.mark.slow
def test_a_config_error_stops_the_search_at_its_first_trial(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_cli(
        [
            "hparams_search=optuna_deit",
            *SHORT,
            "model.name=vit_nope",
            "hydra.sweeper.n_trials=3",
            f"hydra.sweep.dir={sweep}",
        ],
        tmp_path,
    )
    assert result.returncode == 2
    assert error_lines(result.stderr) == [
        "error: model.name=vit_nope is not a timm model. Pick a preset with "
        "model=vit_micro|vit_ti16|vit_s16|vit_b16|vit_b32|vit_l16."
    ]
    assert "Traceback" not in result.stderr
    assert [(n, state) for n, state, _ in trials_of(sweep)] == [(0, "FAIL")]
    assert "Trial 0 failed" in result.stdout and "stopping" in result.stdout
    assert not (sweep / "1").exists()


def test_trial_function_hands_train_py_user_error_exit_to_the_search():
    # Looked up now: Hydra's plugin scan in an earlier test may have re-imported the module.
    from hydra_plugins.vitrain_sweeps.optuna_sweeper import TrialError, TrialFunction
    from vitrain.errors import Preempted, UserError

    def main(error):
        """train.py's main: an error line and exit 2 for a UserError, exit 143 for a stop."""
        try:
            raise error
        except UserError as err:
            raise SystemExit(2) from err
        except Preempted as stop:
            sys.exit(stop.exit_code)

    with pytest.raises(TrialError, match="^data.root=/x does not exist") as caught:
        TrialFunction(main)(UserError("data.root=/x does not exist"))
    assert caught.value.__context__ is None  # nothing of the failed trial is held on to
    # A submitit job pickles it back to the search, which then knows who printed its line.
    back = pickle.loads(pickle.dumps(caught.value))
    assert str(back) == str(caught.value) and back.printed_by == caught.value.printed_by
    with pytest.raises(SystemExit) as stopped:  # a preempted trial still ends the search
        TrialFunction(main)(Preempted("SIGTERM", exit_code=143))
    assert stopped.value.code == 143


def test_max_failure_rate_is_refused(tmp_path, capsys):
    cfg = compose_with_hydra(
        [
            "hparams_search=optuna_deit",
            "hydra.sweeper.max_failure_rate=0.5",
            f"hydra.sweep.dir={tmp_path}",
        ]
    )
    with pytest.raises(SystemExit) as stopped:
        instantiate_plugin(cfg, "sweeper").sweep([])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: hydra.sweeper.max_failure_rate=0.5 is not used")
    assert not (tmp_path / "optuna.db").exists()


def search_with(tmp_path, results) -> tuple[list, object]:
    """The sweeper as Hydra builds it, its jobs not run: job n returns results(n) (a number, or
    an exception it failed with). Returns the list the launched jobs' overrides go to, and the
    sweeper."""
    from hydra.core.utils import JobReturn, JobStatus

    cfg = compose_with_hydra(["hparams_search=optuna_deit", f"hydra.sweep.dir={tmp_path}"])
    sweeper = instantiate_plugin(cfg, "sweeper")
    launched = []

    def launch(jobs, initial_job_idx):
        returns = []
        for number, job in enumerate(jobs, initial_job_idx):
            launched.append(list(job))
            result = results(number)
            failed = isinstance(result, BaseException)
            returns.append(
                JobReturn(
                    overrides=list(job),
                    hydra_cfg=OmegaConf.create(
                        {"hydra": {"runtime": {"output_dir": f"j{number}"}}}
                    ),
                    status=JobStatus.FAILED if failed else JobStatus.COMPLETED,
                    _return_value=result,
                )
            )
        return returns

    sweeper.sweeper.launcher.launch = launch
    return launched, sweeper


def test_a_failed_trial_beside_a_completed_one_does_not_stop_the_search(tmp_path, caplog):
    """Two trials at a time: in the first pair one fails (not a UserError) and one completes."""
    error = RuntimeError("CUDA error: an illegal memory access\nmore lines")
    launched, sweeper = search_with(tmp_path, lambda n: error if n == 0 else 0.5)
    sweeper.sweeper.n_jobs, sweeper.sweeper.n_trials = 2, 4
    sweeper.sweep(["recipe.base_lr=choice(1e-3,2e-3)", "recipe.weight_decay=0.05"])
    assert len(launched) == 4
    assert [(n, state) for n, state, _ in trials_of(tmp_path)] == [
        (0, "FAIL"),
        (1, "COMPLETE"),
        (2, "COMPLETE"),
        (3, "COMPLETE"),
    ]
    (warning,) = [r.message for r in caplog.records if r.levelname == "WARNING"]
    assert warning.startswith("Trial 0 failed (") and "recipe.base_lr=" in warning
    assert "in j0: RuntimeError: CUDA error: an illegal memory access -- the search" in warning


def test_a_first_trial_that_raises_or_returns_nothing_stops_the_search(tmp_path, capsys):
    launched, sweeper = search_with(tmp_path / "raises", lambda n: KeyError("boom"))
    with pytest.raises(KeyError, match="boom"):  # with its traceback, as Hydra shows it
        sweeper.sweep([])
    assert len(launched) == 1 and trials_of(tmp_path / "raises")[0][1] == "FAIL"
    # No val/acc1 to maximise (experiment=speed): every trial would return None.
    launched, sweeper = search_with(tmp_path / "none", lambda n: None)
    with pytest.raises(SystemExit) as stopped:
        sweeper.sweep([])
    assert stopped.value.code == 2 and len(launched) == 1
    (line,) = error_lines(capsys.readouterr().err)
    assert line.startswith("error: the trial returned None, not a number for Optuna")


def test_a_grid_search_ends_with_its_grid(tmp_path):
    import functools

    launched, sweeper = search_with(tmp_path, lambda n: 0.5)
    sweeper.sweeper.sampler = functools.partial(optuna.samplers.GridSampler)  # sampler=grid
    grid = ["recipe.base_lr=choice(1e-3,2e-3)", "recipe.weight_decay=choice(0.05)"]
    grid += ["model.drop_path_rate=choice(0)", "recipe.mixup_alpha=choice(0)"]
    sweeper.sweep(grid)  # n_trials=20, but the grid has 2 points
    assert sorted(job[0] for job in launched) == ["recipe.base_lr=0.001", "recipe.base_lr=0.002"]
    assert OmegaConf.load(tmp_path / "optimization_results.yaml").best_value == 0.5


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
    header, *rows = [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in table.splitlines()
        if line.startswith("|") and "---" not in line
    ]
    assert header[:4] == list(SEARCHED)  # the sampled values, which differ between the trials
    for cells, trial in zip(rows, (study.trials[0], study.trials[2]), strict=True):
        row = dict(zip(header, cells, strict=True))
        assert all(row[key] == setting_text(trial.params[key]) for key in SEARCHED), row
        assert row["best val/acc1 (%)"] == f"{100 * trial.value:.2f}"  # as the study saw it


# --- hydra/launcher=slurm and hydra/launcher=local --------------------------------------------


@pytest.mark.parametrize(
    ("launcher", "executor"), [("slurm", "SlurmExecutor"), ("local", "LocalExecutor")]
)
def test_launcher_keys_are_submitit_parameters(tmp_path, launcher, executor):
    """Each key must reach submitit under a name it knows: the plugin passes its base keys as
    AutoExecutor's shared parameters and the others prefixed with the executor's name."""
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    cfg = compose_with_hydra(
        [f"hydra/launcher={launcher}", "trainer.devices=2", f"hydra.sweep.dir={tmp_path}"]
    )
    keys = set(cfg.hydra.launcher) - {"_target_", "submitit_folder"}
    # What submitit's executors accept, read from submitit itself.
    shared = set(submitit.AutoExecutor._valid_parameters())
    specific = set(getattr(submitit, executor)._valid_parameters())
    init_args = set(inspect.signature(getattr(submitit, executor).__init__).parameters)
    for key in keys:
        if key in OmegaConf.structured(BaseQueueConf):
            assert key in shared, key
        else:
            assert key in specific or key in init_args, key


def test_slurm_launcher_asks_for_what_the_trainer_uses(tmp_path, monkeypatch):
    """Composed and handed to submitit by the plugin's own launch(): the sbatch script asks for
    trainer.devices tasks and GPUs on each of trainer.num_nodes nodes."""
    cfg = compose_with_hydra(
        [
            "hydra/launcher=slurm",
            "strategy=ddp",
            "trainer.devices=8",
            "trainer.num_nodes=2",
            "hydra.launcher.partition=gpu",
            f"hydra.sweep.dir={tmp_path}",
        ]
    )
    launcher = instantiate_plugin(cfg, "launcher")
    assert type(launcher).__name__ == "SlurmLauncher"

    class Submitted(Exception):
        pass

    def map_array(executor, fn, *args):
        executor.vitrain_jobs = list(zip(*args, strict=True))
        raise Submitted(executor)

    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 1))
    monkeypatch.setattr(submitit.AutoExecutor, "map_array", map_array)
    with pytest.raises(Submitted) as submitted:
        launcher.launch([["seed=1"], ["seed=2"]], initial_job_idx=0)
    executor = submitted.value.args[0]
    assert [job[2] for job in executor.vitrain_jobs] == [0, 1]  # job numbers
    script = executor._executor._make_submission_file_text("python -m task", "uid")
    for line in (
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --partition=gpu",
        "#SBATCH --time=60",
        "#SBATCH --signal=USR2@120",
    ):
        assert line in script.splitlines(), line
    assert "srun" in script  # every task is started by srun: one DDP rank each


def test_submitit_launchers_need_a_number_of_devices(tmp_path):
    from omegaconf.errors import InterpolationValidationError

    for launcher in ("slurm", "local"):
        cfg = compose_with_hydra([f"hydra/launcher={launcher}", f"hydra.sweep.dir={tmp_path}"])
        with pytest.raises(InterpolationValidationError, match="'auto'"):
            cfg.hydra.launcher.tasks_per_node  # noqa: B018


def test_ddp_ranks_come_from_slurm(tmp_path, monkeypatch):
    """In a SLURM task (what submitit starts), Lightning takes rank and world size from SLURM_*
    and starts no processes; the launcher config makes the tasks match the Trainer's devices."""
    from lightning.fabric.plugins.environments import SLURMEnvironment
    from lightning.fabric.utilities import rank_zero
    from lightning_utilities.core import rank_zero as core_rank_zero

    from vitrain.train import build_trainer

    overrides = ["hydra/launcher=slurm", *SHORT, "strategy=ddp_cpu", f"hydra.sweep.dir={tmp_path}"]
    launcher = compose_with_hydra(overrides).hydra.launcher
    tasks, nodes = launcher.tasks_per_node, launcher.nodes
    assert (tasks, nodes) == (2, 1)
    slurm = {
        "SLURM_NTASKS": str(tasks * nodes),
        "SLURM_NTASKS_PER_NODE": str(tasks),
        "SLURM_NNODES": str(nodes),
        "SLURM_PROCID": "1",
        "SLURM_LOCALID": "1",
        "SLURM_NODEID": "0",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": launcher.name,
        "SLURM_NODELIST": "localhost",
    }
    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    for module in (rank_zero, core_rank_zero):  # the Trainer sets the process-wide rank
        monkeypatch.setattr(module.rank_zero_only, "rank", module.rank_zero_only.rank)
    trainer = build_trainer(compose_config([*SHORT, "strategy=ddp_cpu"], tmp_path), [], [])
    environment = trainer.strategy.cluster_environment
    assert isinstance(environment, SLURMEnvironment)
    assert environment.creates_processes_externally
    assert (trainer.world_size, trainer.global_rank, trainer.local_rank) == (2, 1, 1)
    environment.validate_settings(num_devices=trainer.num_devices, num_nodes=trainer.num_nodes)


def test_local_launcher_gives_running_jobs_disjoint_gpus(tmp_path, monkeypatch):
    cfg = compose_with_hydra(
        ["hydra/launcher=local", "trainer.devices=2", f"hydra.sweep.dir={tmp_path}"]
    )
    launcher = instantiate_plugin(cfg, "launcher")
    assert type(launcher).__name__ == "SubmititLocalLauncher"
    # The plugin's launcher it extends (Hydra's plugin scan may have re-imported the module).
    (LocalLauncher,) = type(launcher).__bases__
    assert LocalLauncher.__name__ == "LocalLauncher"
    waves = []
    monkeypatch.setattr(
        LocalLauncher, "launch", lambda self, jobs, idx: waves.append((len(jobs), idx)) or jobs
    )
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,4,5,6,7")  # 5 GPUs: two 2-GPU jobs at a time
    monkeypatch.setenv("MASTER_PORT", "12345")  # inherited: no job may use it
    jobs = [[f"seed={i}"] for i in range(5)]
    assert launcher.launch(jobs, initial_job_idx=10) == jobs
    assert waves == [(2, 10), (2, 12), (1, 14)]
    assert sorted(launcher.master_ports) == [10, 11, 12, 13, 14]
    ports = set(launcher.master_ports.values())
    assert len(ports) == 5 and 12345 not in ports
    assert [job_gpus(launcher.gpus, 2, n) for n in (10, 11)] == [["3", "4"], ["5", "6"]]
    assert job_gpus(launcher.gpus, 2, 13) == ["5", "6"]

    # In the job: its GPUs, and its task's rank in torch.distributed's variables.
    seen = {}
    monkeypatch.setattr(LocalLauncher, "__call__", lambda self, *a: seen.update(os.environ))
    task = {
        "SUBMITIT_EXECUTOR": "local",
        "SUBMITIT_LOCAL_JOB_ID": "777",
        "SUBMITIT_LOCAL_NTASKS": "2",
        "SUBMITIT_LOCAL_JOB_NUM_NODES": "1",
        "SUBMITIT_LOCAL_NODEID": "0",
        "SUBMITIT_LOCAL_GLOBALID": "1",
        "SUBMITIT_LOCAL_LOCALID": "1",
    }
    for key, value in task.items():
        monkeypatch.setenv(key, value)
    for key in ("MASTER_ADDR", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.setenv(key, "")  # recorded, so that teardown removes what the job exports
        monkeypatch.delenv(key)
    launcher(["seed=1"], "hydra.sweep.dir", 13, "job_id_for_13", {})
    assert seen["CUDA_VISIBLE_DEVICES"] == "5,6"
    assert seen["MASTER_PORT"] == str(launcher.master_ports[13])
    assert (seen["RANK"], seen["LOCAL_RANK"], seen["WORLD_SIZE"]) == ("1", "1", "2")

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    with pytest.raises(ValueError, match="asks for 2 GPUs.*has 1"):
        launcher.launch(jobs, initial_job_idx=0)


@pytest.mark.slow
def test_local_launcher_runs_each_rank_as_a_submitit_task(tmp_path):
    """2 jobs through submitit's local executor, each DDP on 2 CPU processes that submitit starts
    as the job's tasks (Lightning starting its own would fail: it would re-run submitit)."""
    sweep = tmp_path / "sweep"
    result = run_cli(
        [
            "-m",
            "hydra/launcher=local",
            *SHORT,
            "strategy=ddp_cpu",
            "hydra.launcher.timeout_min=10",
            "seed=1,2",
            f"hydra.sweep.dir={sweep}",
        ],
        tmp_path,
        # 4 processes on 2 cores; an inherited MASTER_PORT must not join one job's ranks to
        # the other's process group (both jobs run at the same time).
        env={"OMP_NUM_THREADS": "1", "MASTER_PORT": "29511"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    reports = [json.loads((sweep / str(n) / "run_report.json").read_text()) for n in (0, 1)]
    assert [r["config"]["seed"] for r in reports] == [1, 2]
    for report in reports:
        assert report["config"]["strategy"] == "DDPStrategy" and report["config"]["devices"] == 2
        assert report["run"]["status"] == "finished"
    # Each job is one submitit job with two task logs; rank 1 ran as task 1.
    jobs = sorted(p for p in (sweep / ".submitit").iterdir() if p.name.isdigit())
    assert len(jobs) == 2
    for job in jobs:
        assert (job / f"{job.name}_1_log.out").exists()
        assert "GLOBAL_RANK: 1, MEMBER: 2/2" in (job / f"{job.name}_1_log.err").read_text()
    assert not list(sweep.rglob("train_ddp_process_*.log"))  # Lightning launched nothing
    assert not (tmp_path / "logs").exists()
