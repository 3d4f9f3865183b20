"""vitrain's Hydra plugins: what hydra-optuna-sweeper leaves to the application, and nothing else
(Hydra instantiates plugins only from the hydra_plugins package).

- optuna_sweeper.OptunaSweeper (conf/hparams_search/): the plugin's sweeper, resumable.

It needs `pip install -e ".[sweeps]"`; without it the module defines nothing, so that Hydra's
plugin scan, which imports every hydra_plugins module on every run, stays silent.
"""
