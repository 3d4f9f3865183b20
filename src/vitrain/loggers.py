"""Loggers from the logger/ group; wandb runs offline unless a key is found, and never prompts;
the CSV file keeps the rows of every attempt of a run."""

import csv
import io
import logging
import netrc
import os
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from hydra.utils import instantiate
from lightning.pytorch.core.saving import save_hparams_to_yaml
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment
from omegaconf import DictConfig, OmegaConf

from vitrain.errors import UserError
from vitrain.lightning_internals import started_wandb_run
from vitrain.secrets import redact, redacted_argv

log = logging.getLogger(__name__)

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


class RunMetricsFile:
    """`metrics.csv` of every attempt of a run, one file: what Lightning's CSV writer does, but
    it continues the rows of earlier attempts (Lightning's deletes the file when it starts, so a
    resume lost the run's history), each row says its attempt, and a change of header rewrites
    the file beside it and renames it over (Lightning's rewrites it in place: a kill or a full
    disk then loses rows). What a failed append wrote is cut off again."""

    NAME = "metrics.csv"

    def __init__(self, log_dir: str, attempt: int) -> None:
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.log_dir / self.NAME
        self.attempt = attempt
        self.metrics: list[dict[str, Any]] = []  # rows not yet written
        self.keys: list[str] = self._header()

    def _header(self) -> list[str]:
        if not self.path.is_file():
            return []
        with open(self.path, newline="") as handle:
            return next(csv.reader(handle), [])

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        row = {k: v.item() if isinstance(v, torch.Tensor) else v for k, v in metrics.items()}
        row["step"] = len(self.metrics) if step is None else step
        row["attempt"] = self.attempt
        self.metrics.append(row)

    def log_hparams(self, params: dict[str, Any]) -> None:
        path = self.log_dir / "hparams.yaml"
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            save_hparams_to_yaml(tmp, params)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def save(self) -> None:
        if not self.metrics:
            return
        keys = sorted(set(self.keys).union(*self.metrics))
        if keys != self.keys or not self.path.is_file():
            self._rewrite(keys)
        else:
            self._append()
        self.metrics = []

    def _rows(self, keys: list[str], rows: list[dict], header: bool) -> str:
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=keys)
        if header:
            writer.writeheader()
        writer.writerows(rows)
        return text.getvalue()

    def _rewrite(self, keys: list[str]) -> None:
        old = []
        if self.path.is_file():
            with open(self.path, newline="") as handle:
                old = list(csv.DictReader(handle))
        tmp = self.path.with_name(f".{self.NAME}.tmp")
        try:
            tmp.write_text(self._rows(keys, old + self.metrics, header=True))
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)
        self.keys = keys

    def _append(self) -> None:
        with open(self.path, "a", newline="") as handle:
            size = handle.tell()
            try:
                handle.write(self._rows(self.keys, self.metrics, header=False))
                handle.flush()
            except OSError:
                handle.truncate(size)
                raise


class RunCSVLogger(CSVLogger):
    """Lightning's CSVLogger writing through RunMetricsFile: one metrics.csv for the whole run,
    an `attempt` column telling the attempts apart (`attempt`: this one's number)."""

    def __init__(self, *args, attempt: int = 1, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.attempt = attempt
        self._metrics_file: RunMetricsFile | None = None

    @property
    @rank_zero_experiment
    def experiment(self) -> RunMetricsFile:
        if self._metrics_file is None:
            self._metrics_file = RunMetricsFile(self.log_dir, self.attempt)
        return self._metrics_file

    def finalize(self, status: str) -> None:
        if self._metrics_file is not None:  # nothing to write where no row was logged
            self.save()


def wandb_node(node: DictConfig, output_dir: Path, mode: str) -> DictConfig:
    """The WandbLogger's config with its mode and its run id (one per run directory)."""
    return OmegaConf.merge(node, {"mode": mode, "id": node.get("id") or wandb_run_id(output_dir)})


def build_loggers(
    logger_cfg: DictConfig | None, output_dir: Path, attempt: int = 1
) -> list[Logger]:
    """The loggers of logger_cfg; `attempt`: this attempt's number in the run (the CSV rows
    carry it)."""
    loggers = []
    for name, node in (logger_cfg or {}).items():
        if name == "wandb":
            node = wandb_node(node, output_dir, resolve_wandb_mode(node.get("mode", "auto")))
        extra = {"attempt": attempt} if name == "csv" else {}
        loggers.append(instantiate(node, _convert_="all", **extra))
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


def start_loggers(
    loggers: list[Logger], params: dict, logger_cfg: DictConfig | None, output_dir: Path
) -> list[Logger]:
    """Log the run's config to each logger, which starts wandb's run; returns the loggers to
    train with.

    wandb online that cannot reach its server (no network, a firewall, the server down) is
    replaced by the same run offline, with one warning, and training goes on: the metrics are
    kept in the run directory and `wandb sync` uploads them later, while stopping would waste
    the run's compute over a dashboard. A key that wandb refuses (malformed, revoked) is the
    user's to fix: one error, before training.
    """
    started = []
    with redacted_argv():  # wandb starts its run here and records the command line
        for logger in loggers:
            if isinstance(logger, WandbLogger):
                logger = _start_wandb(logger, params, logger_cfg, output_dir)
            else:
                logger.log_hyperparams(params)
            started.append(logger)
    return started


def _start_wandb(
    logger: WandbLogger, params: dict, logger_cfg: DictConfig, output_dir: Path
) -> WandbLogger:
    import wandb
    from wandb.errors import AuthenticationError, CommError

    try:
        logger.log_hyperparams(params)
        return logger
    except AuthenticationError as err:
        raise UserError(
            f"wandb refused WANDB_API_KEY ({redact(str(err)).splitlines()[0]}): set the key of "
            "https://wandb.ai/authorize (or `wandb login`), or log offline with "
            "logger.wandb.mode=offline."
        ) from None
    except CommError as err:
        reason = redact(str(err)).strip().splitlines()[0][:160]
        log.warning(
            f"wandb cannot reach its server ({reason}): logging this run offline in "
            f"{output_dir}/wandb instead; upload it later with `wandb sync`."
        )
    wandb.teardown()  # the failed online start still holds the run id
    offline = instantiate(wandb_node(logger_cfg.wandb, output_dir, "offline"), _convert_="all")
    offline.log_hyperparams(params)
    return offline


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
