"""Hydra multirun + Lightning DDP: keep each job's DDP children inside that job.

Lightning's subprocess launcher starts ranks 1..N-1 by re-running sys.argv with
`hydra.run.dir=<HydraConfig.run.dir>` appended (Lightning issue 11300). In a multirun, sys.argv
holds `-m` and the whole sweep, so each child would start a sweep of its own in another directory.
Before fit, point both at the current job: its own overrides and its own output directory. The
children then run exactly this job as a single run, in this job's directory.
"""

import contextlib
import os
import sys
from collections.abc import Iterator

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import open_dict, read_write


def pin_ddp_children_to_this_job() -> bool:
    """Rewrite sys.argv and hydra.run.dir for the current multirun job; False outside multirun."""
    if not HydraConfig.initialized():
        return False
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return False
    # hydra.mode=RUN: a config that sets hydra.mode=MULTIRUN (hparams_search=optuna_deit, as in
    # the Lightning-Hydra template) would otherwise make every child start a search of its own.
    sys.argv = [sys.argv[0], *hydra_cfg.overrides.task, "hydra.mode=RUN"]
    with read_write(hydra_cfg), open_dict(hydra_cfg):
        hydra_cfg.run.dir = hydra_cfg.runtime.output_dir
    return True


@contextlib.contextmanager
def job_environment() -> Iterator[None]:
    """Restore os.environ after a job: Lightning's DDP set-up writes MASTER_PORT, LOCAL_RANK and
    friends into it, and the next job of a multirun must launch its own ranks from scratch."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        # The next job of a multirun starts its own process group with its own DDP children.
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        os.environ.clear()
        os.environ.update(saved)
