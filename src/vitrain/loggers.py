"""Loggers from the logger/ group; wandb runs offline unless a key is found, and never prompts."""

import netrc
import os
import uuid
from pathlib import Path
from urllib.parse import urlparse

from hydra.utils import instantiate
from lightning.pytorch.loggers import Logger, WandbLogger
from omegaconf import DictConfig, OmegaConf

from vitrain.errors import UserError
from vitrain.lightning_internals import started_wandb_run

WANDB_MODES = ("auto", "online", "offline", "disabled")


def has_wandb_api_key() -> bool:
    """True when wandb would authenticate without asking: WANDB_API_KEY or a `wandb login` netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def resolve_wandb_mode(mode: str) -> str:
    """WANDB_MODE from the environment wins; `auto` means online only with a key."""
    if mode not in WANDB_MODES:
        raise UserError(f"logger.wandb.mode={mode} is not one of {', '.join(WANDB_MODES)}.")
    env_mode = os.environ.get("WANDB_MODE")
    if env_mode:
        return "offline" if env_mode == "dryrun" else env_mode
    if mode == "auto":
        return "online" if has_wandb_api_key() else "offline"
    return mode


def wandb_run_id(output_dir: Path) -> str:
    """One wandb run per run directory: a resumed run continues the same wandb run."""
    id_file = output_dir / "wandb_run_id"
    if id_file.is_file():
        return id_file.read_text().strip()
    run_id = uuid.uuid4().hex[:8]  # wandb's id format: 8 lowercase letters and digits
    output_dir.mkdir(parents=True, exist_ok=True)
    id_file.write_text(run_id + "\n")
    return run_id


def build_loggers(logger_cfg: DictConfig | None, output_dir: Path) -> list[Logger]:
    loggers = []
    for name, node in (logger_cfg or {}).items():
        if name == "wandb":
            mode = resolve_wandb_mode(node.get("mode", "auto"))
            node = OmegaConf.merge(
                node, {"mode": mode, "id": node.get("id") or wandb_run_id(output_dir)}
            )
        loggers.append(instantiate(node, _convert_="all"))
    return loggers


def _wandb_mode(run) -> str | None:
    return run.settings.mode if run.settings else None


def online_wandb_run(loggers: list[Logger]):
    """The wandb run of these loggers if one has started and uploads as it goes, else None."""
    for logger in loggers:
        run = started_wandb_run(logger) if isinstance(logger, WandbLogger) else None
        if run is not None and _wandb_mode(run) not in (None, "offline", "dryrun", "disabled"):
            return run
    return None


def finish_loggers(loggers: list[Logger]) -> None:
    """End each wandb run so that the next job of a multirun starts its own."""
    for logger in loggers:
        run = started_wandb_run(logger) if isinstance(logger, WandbLogger) else None
        if run is not None:
            offline = _wandb_mode(run) in ("offline", "dryrun")
            run_dir = os.path.dirname(run.dir) if run.dir else None
            run.finish()
            if offline and run_dir:
                print(
                    f"wandb: offline run in {run_dir}; upload it: wandb sync {run_dir}", flush=True
                )


def record_summary(loggers: list[Logger], values: dict[str, float]) -> None:
    """Run-level figures as wandb summary values (the other loggers have no summary to hold
    them; run_report.json has them all)."""
    for logger in loggers:
        run = started_wandb_run(logger) if isinstance(logger, WandbLogger) else None
        if run is not None:
            run.summary.update(values)
