"""Checkpoints that survive kills: atomic writes, and the resume lookup."""

import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from vitrain.preemption import LAST


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write beside the target, fsync, then rename over it.

    Lightning's own save goes through fsspec, whose local "transaction" writes to a temporary
    file that may sit on another file system; a kill during the final copy leaves a truncated
    checkpoint in place of the good one. os.replace within one directory cannot.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as handle:
                torch.save(checkpoint, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def resume_checkpoint(output_dir: str | Path) -> Path | None:
    """The run directory's last checkpoint, which resume=auto continues from."""
    path = Path(output_dir) / "checkpoints" / LAST
    return path if path.is_file() else None
