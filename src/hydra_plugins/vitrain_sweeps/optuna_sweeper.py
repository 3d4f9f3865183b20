"""hydra-optuna-sweeper's OptunaSweeper, resumable from its storage.

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
"""

import logging
from pathlib import Path
from typing import Any

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


if PluginSweeper is not None:

    class OptunaSweeper(PluginSweeper):
        """The plugin's sweeper; a rerun on the same storage continues its study."""

        def sweep(self, arguments: list[str]) -> None:
            impl = self.sweeper
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
            return impl.sweep(arguments)
