"""Hydra entry point: `python eval.py ckpt_path=<checkpoint> data.root=<folder> ...`."""

import os
import sys

# Paths in conf/ are built from the project root, never from the current directory.
os.environ.setdefault("VITRAIN_ROOT", os.path.dirname(os.path.abspath(__file__)))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from vitrain.config import register_configs  # noqa: E402
from vitrain.errors import UserError  # noqa: E402

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> float | None:
    from vitrain.evaluate import evaluate

    try:
        metrics = evaluate(cfg)
    except UserError as err:
        # SystemExit passes through Hydra's handler: one message, exit code 2, no traceback.
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    # Returned for Hydra sweepers that optimise a value.
    return metrics.get("val/acc1")


if __name__ == "__main__":
    main()
