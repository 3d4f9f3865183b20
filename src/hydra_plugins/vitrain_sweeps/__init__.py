"""vitrain's Hydra plugins: what hydra-optuna-sweeper and hydra-submitit-launcher leave to the
application, and nothing else (Hydra instantiates plugins only from the hydra_plugins package).

- optuna_sweeper.OptunaSweeper (conf/hparams_search/): the plugin's sweeper, resumable, and going
  on past a failed trial once one has completed.
- submitit_launcher.SubmititLocalLauncher (conf/hydra/launcher/local.yaml): the plugin's local
  launcher with DDP ranks as tasks and disjoint GPUs for the jobs that run at the same time.

Both need `pip install -e ".[sweeps]"`; without it they define nothing, so that Hydra's plugin
scan, which imports every hydra_plugins module on every run, stays silent.
"""
