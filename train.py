"""Hydra entry point: `python train.py model=vit_b16 trainer.precision=16-mixed data.root=...`."""

import os
import sys

# Paths in conf/ are built from the project root, never from the current directory.
os.environ.setdefault("VITRAIN_ROOT", os.path.dirname(os.path.abspath(__file__)))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from vitrain.config import register_configs  # noqa: E402
from vitrain.errors import Preempted, UserError  # noqa: E402

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from vitrain.preemption import STOP_SIGNALS
    from vitrain.train import train

    # This process ends after a stop: a burst of SIGTERMs must not kill it while it does.
    STOP_SIGNALS.ignore_after_stop = True

    try:
        metrics = train(cfg)
    except UserError as err:
        # SystemExit passes through Hydra's handler: one message, exit code 2, no traceback. Its
        # cause is how an Optuna search tells this exit from others (hydra_plugins/vitrain_sweeps).
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from err
    except Preempted as stop:
        print(f"preempted: {stop}", file=sys.stderr)
        sys.exit(stop.exit_code)
    # Returned for Hydra sweepers that optimise a value.
    return metrics.get("val/acc1")


if __name__ == "__main__":
    main()
