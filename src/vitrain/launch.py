"""Hydra multirun + Lightning DDP: keep each job's DDP children inside that job.

Lightning's subprocess launcher starts ranks 1..N-1 by re-running sys.argv with
`hydra.run.dir=<HydraConfig.run.dir>` appended (Lightning issue 11300). In a multirun, sys.argv
holds `-m` and the whole sweep, so each child would start a sweep of its own in another directory.
Before fit, point both at the current job: its own overrides and its own output directory. The
children then run exactly this job as a single run, in this job's directory.
"""

import sys

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
    sys.argv = [sys.argv[0], *hydra_cfg.overrides.task]
    with read_write(hydra_cfg), open_dict(hydra_cfg):
        hydra_cfg.run.dir = hydra_cfg.runtime.output_dir
    return True
