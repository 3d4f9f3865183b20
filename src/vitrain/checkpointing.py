"""Checkpoints that survive kills: atomic writes, and which checkpoint a run resumes from.

`choose_checkpoint` runs in train() before any logger or callback touches the run directory, so
that a resume that cannot go ahead (no readable checkpoint, one of another model) ends with one
`error:` line and changes nothing. Each rank chooses for itself, from the same files, the same
way; only rank 0 moves files.
"""

import datetime
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from vitrain.data.layout import class_difference
from vitrain.errors import UserError
from vitrain.preemption import LAST

log = logging.getLogger(__name__)


def _on_rank_zero(level: int, message: str) -> None:
    """Every rank chooses; rank 0 alone moves files, and says so."""
    if rank_zero_only.rank == 0:
        log.log(level, message)


RESUME = ("auto", "never")
# Where files of the run directory go that a resume must not use or keep beside its own.
UNREADABLE_DIR = "unreadable"  # checkpoints that cannot be read
SUPERSEDED_DIR = "superseded"  # checkpoints the resumed state does not know (another timeline)
# A Lightning checkpoint has these (Trainer.save_checkpoint writes them first).
LIGHTNING_KEYS = ("epoch", "global_step", "state_dict")
# conf/model/vit.yaml takes these model keys from the data config: a difference there is the
# data override's.
MODEL_KEYS_FROM_DATA = {"img_size": "data.image_size", "num_classes": "data.num_classes"}


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


class ResumePoint(NamedTuple):
    """The checkpoint a run resumes from, and where in the run it was written."""

    path: Path
    epoch: int
    global_step: int


class Unreadable(Exception):
    """A checkpoint file that does not load as a Lightning checkpoint; the message says why."""


def read_checkpoint(path: Path) -> dict:
    """The checkpoint at path, its tensors memory-mapped (nothing is read that is not used)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as err:  # torch raises many kinds for a cut or garbage file
        reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise Unreadable(f"{type(err).__name__}: {reason}"[:200]) from None
    if not isinstance(checkpoint, dict) or not all(k in checkpoint for k in LIGHTNING_KEYS):
        raise Unreadable("not a Lightning checkpoint (no epoch, global_step and state_dict)")
    return checkpoint


def run_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """The run's checkpoint files, newest first (last.ckpt first among equals)."""
    if not checkpoint_dir.is_dir():
        return []
    files = [p for p in checkpoint_dir.glob("*.ckpt") if p.is_file()]
    return sorted(files, key=lambda p: (p.stat().st_mtime, p.name == LAST), reverse=True)


def _flat(tree: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _flat(value, f"{prefix}{key}.")
    else:
        yield prefix.rstrip("."), tree


def differing_settings(checkpoint: dict, cfg: DictConfig) -> list[str]:
    """The model settings the checkpoint was written with that this run sets otherwise, as the
    overrides that would restore them (`data.image_size=32 (this run: 64)`)."""
    saved = checkpoint.get("hyper_parameters", {}).get("model")
    if not isinstance(saved, dict):
        return []
    current = dict(_flat(OmegaConf.to_container(cfg.model, resolve=True)))
    differences = []
    for key, value in _flat(saved):
        if key in current and current[key] != value:
            override = MODEL_KEYS_FROM_DATA.get(key, f"model.{key}")
            differences.append(f"{override}={value} (this run: {current[key]})")
    return differences


def first_mismatch(saved: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> str | None:
    """The first tensor that differs in name or shape between two state dicts, described."""
    for name, tensor in expected.items():
        if name not in saved:
            return f"{name} is missing from the checkpoint"
        if tuple(saved[name].shape) != tuple(tensor.shape):
            shape = tuple(saved[name].shape)
            return f"{name} has shape {shape} there and {tuple(tensor.shape)} in this model"
    extra = next((name for name in saved if name not in expected), None)
    return f"{extra} is in the checkpoint but not in this model" if extra else None


def check_classes_match(path: Path, checkpoint: dict, classes: list[str] | None) -> None:
    """A checkpoint trained on other classes than the data's (its class folders renamed, some
    added or removed at the same count): one error naming them. A checkpoint written before
    runs recorded their class names, or data without names (synthetic), is not checked."""
    trained = (checkpoint.get("datamodule_hyper_parameters") or {}).get("classes")
    if not trained or not classes or list(trained) == list(classes):
        return
    difference = class_difference(list(trained), "the checkpoint", list(classes), "data.root")
    raise UserError(
        f"checkpoint {path} was trained on other classes than data.root's ({difference}): a "
        "class's index is its place among the sorted class names, so this run would train "
        "its images with other classes' labels. Resume with the data the run was trained on, "
        "or start a new run (another hydra.run.dir, or resume=never here; model.init_from "
        "starts from its weights with a new head)."
    )


def check_fits(path: Path, checkpoint: dict, module: torch.nn.Module, cfg: DictConfig) -> None:
    """A checkpoint of another model or image size: one error naming the first mismatched
    tensor and the settings that differ."""
    mismatch = first_mismatch(checkpoint["state_dict"], module.state_dict())
    if mismatch is None:
        return
    differences = differing_settings(checkpoint, cfg)
    fix = (
        f"it was written with {', '.join(differences)}: resume with "
        f"{' '.join(d.split(' (')[0] for d in differences)}"
        if differences
        else "it was written by another model: resume with that model's settings"
    )
    raise UserError(
        f"checkpoint {path} does not fit this model: {mismatch}; {fix}, or start a new run "
        "(another hydra.run.dir, or resume=never here)."
    )


def kept_files(chosen: Path, checkpoint: dict, checkpoint_dir: Path) -> set[Path]:
    """The chosen checkpoint and the files its ModelCheckpoint states keep track of (the best
    and last checkpoints they will replace), resolved. A checkpoint of this run directory names
    files of this directory, even if the directory has moved since it was written."""
    paths = set()
    for state in (checkpoint.get("callbacks") or {}).values():
        if not isinstance(state, dict):
            continue
        paths.update(p for p in (state.get("best_model_path"), state.get("last_model_path")) if p)
        paths.update(state.get("best_k_models") or {})
    ours = chosen.resolve().parent == checkpoint_dir.resolve()
    kept = {(checkpoint_dir / Path(p).name) if ours else Path(p) for p in paths}
    return {p.resolve() for p in kept | {chosen}}


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def move_aside(paths: list[Path], checkpoint_dir: Path, folder: str) -> Path:
    """Move paths into checkpoint_dir/<folder>/<time>-<pid>/ (never deleted); rank 0 only."""
    target = checkpoint_dir / folder / f"{_now()}-{os.getpid()}"
    if rank_zero_only.rank == 0:
        target.mkdir(parents=True, exist_ok=True)
        for path in paths:
            os.replace(path, target / path.name)
    return target


def remove_temporaries(checkpoint_dir: Path) -> None:
    """The temporary files of saves that a kill -9 cut short (`.last.ckpt.tmp-PID`): before a
    run starts, no save of this run is under way; rank 0 only."""
    if rank_zero_only.rank == 0 and checkpoint_dir.is_dir():
        for tmp in checkpoint_dir.glob(".*.tmp-*"):
            tmp.unlink(missing_ok=True)


def choose_checkpoint(
    cfg: DictConfig, output_dir: Path, module: torch.nn.Module, classes: list[str] | None = None
) -> ResumePoint | None:
    """The checkpoint to resume from: `ckpt_path` when given; with resume=auto the newest
    readable checkpoint of this run directory (newer unreadable ones are moved aside with a
    warning); with resume=never none. It must fit the model and the data's `classes`.
    Checkpoints of the run directory that the chosen state does not know (an abandoned
    timeline, or all of them with resume=never) are moved aside, so that no stale best
    checkpoint stays beside the new ones."""
    if cfg.resume not in RESUME:
        raise UserError(f"resume={cfg.resume} is not one of {', '.join(RESUME)}.")
    checkpoint_dir = output_dir / "checkpoints"
    candidates = run_checkpoints(checkpoint_dir)
    chosen, checkpoint, unreadable = None, None, []
    if cfg.ckpt_path:
        chosen = Path(str(cfg.ckpt_path))
        if not chosen.is_file():
            raise UserError(f"ckpt_path={chosen} is not a file: give a checkpoint file.")
        try:
            checkpoint = read_checkpoint(chosen)
        except Unreadable as err:
            raise UserError(
                f"ckpt_path={chosen} cannot be read ({err}): give another checkpoint, e.g. one "
                f"of {checkpoint_dir}."
            ) from None
    elif cfg.resume == "auto" and candidates:
        chosen, checkpoint, unreadable = _newest_readable(candidates, checkpoint_dir)
    if checkpoint is not None:
        check_fits(chosen, checkpoint, module, cfg)
        check_classes_match(chosen, checkpoint, classes)
    # From here on the resume goes ahead; nothing was changed before.
    remove_temporaries(checkpoint_dir)
    if unreadable:
        target = move_aside([bad for bad, _ in unreadable], checkpoint_dir, UNREADABLE_DIR)
        for bad, err in unreadable:
            _on_rank_zero(
                logging.WARNING,
                f"{bad} cannot be read ({err}): moved to {target / bad.name}; resuming from "
                f"{chosen}, the newest readable checkpoint of this run.",
            )
    keep = kept_files(chosen, checkpoint, checkpoint_dir) if checkpoint is not None else set()
    unknown = [p for p in run_checkpoints(checkpoint_dir) if p.resolve() not in keep]
    if unknown:
        target = move_aside(unknown, checkpoint_dir, SUPERSEDED_DIR)
        why = f"{chosen} does not know them" if chosen else "this run starts afresh"
        _on_rank_zero(
            logging.WARNING,
            f"moved {', '.join(p.name for p in unknown)} to {target}: {why}, and a stale best "
            "checkpoint must not stay beside this run's own.",
        )
    if chosen is None:
        return None
    point = ResumePoint(chosen, int(checkpoint["epoch"]), int(checkpoint["global_step"]))
    step = f"epoch {point.epoch}, global step {point.global_step}"
    _on_rank_zero(logging.INFO, f"resuming from {chosen} ({step})")
    return point


def _newest_readable(
    candidates: list[Path], checkpoint_dir: Path
) -> tuple[Path, dict, list[tuple[Path, Unreadable]]]:
    """The newest candidate that reads, and the newer ones that do not."""
    unreadable = []
    for path in candidates:
        try:
            return path, read_checkpoint(path), unreadable
        except Unreadable as err:
            unreadable.append((path, err))
    names = ", ".join(f"{p.name} ({err})" for p, err in unreadable)
    raise UserError(
        f"no checkpoint of {checkpoint_dir} can be read: {names}. Resume from a copy with "
        "ckpt_path=/path/to/good.ckpt, or start afresh with resume=never (the files are kept)."
    )
