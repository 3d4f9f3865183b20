"""The private Lightning attributes vitrain reads, all of them, each with why no public one serves.

Lightning 2.5-2.6. A Lightning upgrade that renames one of these breaks here, in one place; the
tests that run through each (tests/test_speed.py: the logging steps and the batch-size finder's
learning rate; tests/test_resilience.py: the preemption signals; tests/test_train.py: wandb)
then fail.
"""

import signal

import lightning.pytorch as pl
from lightning.fabric.plugins.environments import ClusterEnvironment
from lightning.pytorch.loggers import WandbLogger


def attached_trainer(module: pl.LightningModule) -> pl.Trainer | None:
    """The Trainer a module is attached to, or None (a module built alone: a benchmark, a test).

    Private: `LightningModule._trainer`. The public `module.trainer` raises when there is none.
    """
    return module._trainer


def logs_this_step(trainer: pl.Trainer) -> bool:
    """Whether Lightning writes step metrics after the current batch.

    Private: `trainer._logger_connector.should_update_logs`. Lightning's own test counts the
    batches that stepped an optimizer (`fit_loop.epoch_loop._batches_that_stepped`, also private)
    against log_every_n_steps; global_step counts optimizer steps, which differ under gradient
    accumulation, so a public re-computation would log at other batches than Lightning writes.
    True when the attribute is missing (a future Lightning): logging every step is slow, not wrong.
    """
    connector = getattr(trainer, "_logger_connector", None)
    should = getattr(connector, "should_update_logs", True)
    return bool(should or trainer.fast_dev_run)


def cluster_environment(trainer: pl.Trainer) -> ClusterEnvironment | None:
    """The cluster environment Lightning detected (SLURM, torchrun, ...).

    Private: `trainer._accelerator_connector.cluster_environment`. Public only on parallel
    strategies (`trainer.strategy.cluster_environment`); a single-device run under SLURM has one
    too, and Lightning's own SIGUSR1 handling (auto-requeue) reads it from here.
    """
    return getattr(trainer._accelerator_connector, "cluster_environment", None)


def started_wandb_run(logger: WandbLogger):
    """The wandb run of a WandbLogger if it has started one, else None (never starts one).

    Private: `WandbLogger._experiment`. The public `logger.experiment` starts a run when there is
    none, which at the end of a run that logged nothing would create an empty wandb run.
    """
    return getattr(logger, "_experiment", None)


def keep_signal_handlers(trainer: pl.Trainer, signums: tuple[int, ...]) -> None:
    """Make the Trainer leave the handlers of `signums` as they are when it starts its loops.

    Private: `trainer._signal_connector.register_signal_handlers`. Lightning installs its SIGTERM
    handler in Trainer._run, after every setup hook and just before the loops, composed with any
    handler already there, and no argument turns it off. That handler broadcasts a tensor from
    inside the signal handler, a collective at an arbitrary point, which deadlocks DDP when any
    rank but rank 0 is signalled (vitrain.preemption says how). Lightning still registers what it
    registers (SLURM auto-requeue's SIGUSR1 handler stays), then vitrain's handlers are put back;
    Lightning's teardown restores the handlers it found, which are vitrain's.
    """
    connector = trainer._signal_connector
    register = connector.register_signal_handlers

    def register_then_keep() -> None:
        kept = {signum: signal.getsignal(signum) for signum in signums}
        register()
        for signum, handler in kept.items():
            signal.signal(signum, handler)

    connector.register_signal_handlers = register_then_keep
