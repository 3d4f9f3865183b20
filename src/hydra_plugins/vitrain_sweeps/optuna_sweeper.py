"""hydra-optuna-sweeper's OptunaSweeper, resumable from its storage, and going on past a trial
that fails.

With the study's storage in the sweep directory (conf/hparams_search/optuna_deit.yaml),
rerunning the same command continues the study instead of starting over:
  - `hydra.sweeper.n_trials` is the number of completed trials the study should reach; a rerun
    runs only the missing ones (the plugin alone would run n_trials more every time);
  - trials an interrupted search left RUNNING are marked FAIL (TPE ignores them either way);
  - job numbers continue from the study's trial count (the plugin restarts them at 0), so each
    trial has its own directory, `<sweep dir>/<trial number>`, and never lands in an earlier
    trial's directory, where `resume=auto` would continue that trial's checkpoint.
One search process drives a study: two searches on one sweep directory at the same time would
mark each other's running trials failed and share job numbers.

A trial that fails (train.py's `error:` line and exit code 2, or any exception) is marked FAIL
and named in a warning, and the search goes on, as `study.optimize(catch=...)` would: such a
failure usually comes from the sampled values (a NaN loss at a large learning rate, out of
memory at a large setting). Until a trial of this search process has completed, though, a
failure stops the search with that error: one that does not depend on the sampled values (a bad
data.root, an unknown model, a batch too large for the GPU) would fail every trial.
`hydra.sweeper.max_failure_rate`, the plugin's rule for this, is refused when set.
"""

import functools
import logging
import math
import os
import socket
import sys
from pathlib import Path
from typing import Any

from vitrain.errors import UserError

log = logging.getLogger(__name__)

try:
    from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper as PluginSweeper
except ImportError:  # vitrain[sweeps] is not installed
    PluginSweeper = None


def resume_study(storage: Any, study_name: str | None) -> tuple[int, int]:
    """(completed trials, all trials) of an existing study, after marking those an interrupted
    search left RUNNING as FAIL; (0, 0) when there is no such study yet."""
    if storage is None or study_name is None:
        return 0, 0
    import optuna
    from optuna.trial import TrialState

    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:  # a new study
        return 0, 0
    trials = study.get_trials(deepcopy=False)
    for trial in trials:
        if trial.state == TrialState.RUNNING:
            log.warning(f"Trial {trial.number} was interrupted: marking it failed")
            study.tell(trial.number, state=TrialState.FAIL)
    return sum(t.state == TrialState.COMPLETE for t in trials), len(trials)


def _process() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class TrialError(UserError):
    """The UserError that ended a trial, as its JobReturn carries it to the search; `printed_by`:
    the process whose stderr has its `error:` line already (train.py printed it there)."""

    def __init__(self, message: str, printed_by: str) -> None:
        super().__init__(message, printed_by)
        self.message, self.printed_by = message, printed_by

    def __str__(self) -> str:
        return self.message


class TrialFunction:
    """Each trial's task function: train.py's main, whose exit after a UserError comes back as
    that error (TrialError). Hydra's run_job records an exception in the trial's JobReturn
    (status FAILED), but lets a SystemExit through, which would end the search (basic launcher)
    or leave a submitit job without a result."""

    def __init__(self, task_function: Any) -> None:
        self.task_function = task_function

    def __call__(self, cfg: Any) -> Any:
        try:
            return self.task_function(cfg)
        except SystemExit as stop:
            if not isinstance(stop.__cause__, UserError):  # a preemption (143), a bug's exit
                raise
            message = str(stop.__cause__)
        # Raised outside the handler, so that no reference to the failed trial's frames (its
        # model, the GPU memory it holds) rides along in the JobReturn into the next trial.
        raise TrialError(message, _process())


def trial_result(ret: Any, directions: int) -> tuple[list[float] | None, BaseException | None]:
    """(the trial's objective values, None), or (None, the error that failed it)."""
    from hydra.core.utils import JobStatus

    if ret.status != JobStatus.COMPLETED:
        # JobReturn.return_value would raise it, after an "Error executing job" line on stderr.
        return None, ret._return_value
    value = ret._return_value
    try:
        values = [float(v) for v in (value if directions > 1 else [value])]
    except (TypeError, ValueError):
        values = []
    if len(values) != directions or any(math.isnan(v) for v in values):
        wanted = "a number" if directions == 1 else f"{directions} numbers"
        return None, UserError(
            f"the trial returned {value!r}, not {wanted} for Optuna: train.py "
            "returns the final val/acc1, which a run without validation (experiment=speed, "
            "trainer.limit_val_batches=0) does not have; validate in every trial."
        )
    return values, None


def first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else ""
    return text if isinstance(error, UserError) else f"{type(error).__name__}: {text}"


if PluginSweeper is not None:

    class OptunaSweeper(PluginSweeper):
        """The plugin's sweeper; a rerun on the same storage continues its study, and a failed
        trial, once one has completed, does not end the search."""

        def setup(self, *, hydra_context: Any, task_function: Any, config: Any) -> None:
            super().setup(
                hydra_context=hydra_context,
                task_function=TrialFunction(task_function),
                config=config,
            )

        def sweep(self, arguments: list[str]) -> None:
            impl = self.sweeper
            if impl.max_failure_rate:
                print(
                    f"error: hydra.sweeper.max_failure_rate={impl.max_failure_rate} is not used: "
                    "vitrain's sweeper marks a failed trial failed and goes on once a trial of "
                    "the search has completed, and stops at a failure before that (README "
                    "'Resuming'); leave it out.",
                    file=sys.stderr,
                )
                sys.exit(2)
            # sqlite creates its file but not the folder, which the launcher makes only later.
            Path(str(impl.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
            completed, started = resume_study(impl.storage, impl.study_name)
            if started:
                remaining = max(impl.n_trials - completed, 0)
                log.info(
                    f"Study {impl.study_name}: {completed} of {impl.n_trials} trials completed, "
                    f"{started} started; running {remaining} more, from job {started}"
                )
                impl.job_idx = started
                impl.n_trials = remaining
            study, space, fixed, directions = self._study(arguments)
            self._run_trials(study, space, fixed, directions)
            self._save_results(study, directions)

        def _study(self, arguments: list[str]) -> tuple[Any, dict, dict, list[str]]:
            """The plugin's set-up (OptunaSweeperImpl.sweep before its trial loop): the study,
            the search space, the fixed parameters and the directions."""
            import optuna
            from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides

            impl = self.sweeper
            impl._process_searchspace_config()
            params = [*impl._parse_sweeper_params_config(), *arguments]
            space_of_overrides, fixed = create_params_from_overrides(params)
            space = dict(impl.search_space_distributions or {})
            space.update(space_of_overrides)
            self._grid = (
                isinstance(impl.sampler, functools.partial)
                and impl.sampler.func == optuna.samplers.GridSampler
            )
            if self._grid:
                grid = {name: impl._to_grid_sampler_choices(d) for name, d in space.items()}
                impl.sampler = impl.sampler(grid)
                impl.n_trials = min(impl.n_trials, math.prod(len(v) for v in grid.values()))
                log.info(f"Updating num of trials to {impl.n_trials} due to using GridSampler.")
            for name in fixed:
                space.pop(name, None)
            directions = impl._get_directions()
            study = optuna.create_study(
                study_name=impl.study_name,
                storage=impl.storage,
                sampler=impl.sampler,
                directions=directions,
                load_if_exists=True,
            )
            log.info(f"Study name: {study.study_name}")
            log.info(f"Storage: {impl.storage}")
            log.info(f"Sampler: {type(impl.sampler).__name__}")
            log.info(f"Directions: {directions}")
            return study, space, fixed, directions

        def _run_trials(self, study: Any, space: dict, fixed: dict, directions: list) -> None:
            from optuna.trial import TrialState

            impl = self.sweeper
            completed_here = False  # a trial of this command completed: the config itself works
            to_go = impl.n_trials
            while to_go > 0:
                trials = [study.ask() for _ in range(min(to_go, impl.n_jobs))]
                overrides = impl._configure_trials(trials, space, fixed)
                returns = impl.launcher.launch(overrides, initial_job_idx=impl.job_idx)
                impl.job_idx += len(returns)
                failures = []
                for trial, ret in zip(trials, returns, strict=True):
                    values, error = trial_result(ret, len(directions))
                    if error is not None:
                        study.tell(trial, state=TrialState.FAIL)
                        failures.append((trial, ret, error))
                        continue
                    try:
                        study.tell(trial, values=values)
                    except RuntimeError as err:
                        # The grid sampler stops the study when its grid is done, which
                        # outside study.optimize is this error (as in the plugin).
                        if not (self._grid and "`Study.stop` is supposed" in str(err)):
                            raise
                    completed_here = True
                if failures and not completed_here:
                    self._stop(*failures[0])
                for trial, ret, error in failures:
                    log.warning(
                        f"Trial {trial.number} failed ({self._values(trial)}) in "
                        f"{ret.hydra_cfg.hydra.runtime.output_dir}: {first_line(error)} -- the "
                        "search goes on (a failed trial does not count toward n_trials: a "
                        "rerun of the command runs one in its place)"
                    )
                to_go -= len(trials)

        def _values(self, trial: Any) -> str:
            from vitrain.report.compare import setting_text

            return ", ".join(f"{k}={setting_text(v)}" for k, v in trial.params.items())

        def _stop(self, trial: Any, ret: Any, error: BaseException) -> None:
            log.error(
                f"Trial {trial.number} failed ({self._values(trial)}) before any trial of this "
                "search completed: stopping, as an error that does not depend on the sampled "
                "values would fail every trial. Once fixed, the same command continues the "
                "study (the failed trial stays FAIL, which TPE ignores)."
            )
            if isinstance(error, UserError):
                if getattr(error, "printed_by", None) != _process():
                    print(f"error: {error}", file=sys.stderr)
                sys.exit(2)
            ret.return_value  # noqa: B018 -- raises the trial's error, with its traceback

        def _save_results(self, study: Any, directions: list) -> None:
            """optimization_results.yaml in the sweep directory, as the plugin writes it."""
            from omegaconf import OmegaConf

            if len(directions) < 2:
                best = study.best_trial
                results = {"name": "optuna", "best_params": best.params, "best_value": best.value}
                log.info(f"Best parameters: {best.params}")
                log.info(f"Best value: {best.value}")
            else:
                front = [{"params": t.params, "values": t.values} for t in study.best_trials]
                results = {"name": "optuna", "solutions": front}
                log.info(f"Number of Pareto solutions: {len(front)}")
            OmegaConf.save(
                OmegaConf.create(results),
                f"{self.sweeper.config.hydra.sweep.dir}/optimization_results.yaml",
            )
