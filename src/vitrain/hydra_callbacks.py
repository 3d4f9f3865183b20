"""Hydra callbacks (conf/hydra/default.yaml): checks that must run before Hydra writes anything."""

import sys
import tempfile
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from vitrain.errors import docker_hint


def unwritable_reason(directory: Path) -> str | None:
    """Why `directory` cannot be created and written (None: it can), tested in its nearest
    existing ancestor, so that nothing is left behind."""
    existing = directory.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        return f"{existing}: {err.strerror or err}"
    return None


class WritableRunDir(Callback):
    """Hydra creates the run directory, saves its config there and opens its log file before
    vitrain runs: an unwritable one (a logs folder that Docker created as root for a bind mount,
    a read-only mount) would end in Hydra's traceback. Check it first; vitrain's one-line error,
    exit code 2."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config.hydra.run.dir, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config.hydra.sweep.dir, "hydra.sweep.dir")

    @staticmethod
    def _check(directory: str, key: str) -> None:
        reason = unwritable_reason(Path(directory))
        if reason is None:
            return
        hint = docker_hint(
            "compose mounts VITRAIN_LOGS (default ./logs) at /workspace/logs; Docker creates a "
            "missing one owned by root, so run `mkdir -p logs wandb data` before the first run, "
            "or `chown` the folder to this user"
        )
        print(
            f"error: the run directory {directory} is not writable ({reason}): choose another "
            f"with {key}=/writable/path or VITRAIN_LOG_DIR=/writable/path.{hint}",
            file=sys.stderr,
        )
        # SystemExit passes through Hydra's error handler: no traceback.
        sys.exit(2)
