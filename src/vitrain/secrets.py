"""Keep credentials out of everything a run writes: configs, reports, logger metadata."""

import contextlib
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REDACTED = "***"
SECRET_ENV_VARS = (
    "WANDB_API_KEY",
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "NGC_API_KEY",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AZURE_STORAGE_KEY",
    "GITHUB_TOKEN",
)
_SECRET_WORDS = r"api[_-]?key|token|secret|password|passwd|credential"
SECRET_KEY = re.compile(_SECRET_WORDS, re.IGNORECASE)
SECRET_OVERRIDE = re.compile(rf"([\w.+~/-]*(?:{_SECRET_WORDS})[\w.-]*=)([^,\s]+)", re.IGNORECASE)


def secret_values() -> list[str]:
    """Values of the credential variables set now (short ones would redact ordinary text)."""
    return [v for k in SECRET_ENV_VARS if len(v := os.environ.get(k, "")) >= 8]


def redact(value: Any, secrets: list[str] | None = None) -> Any:
    """A copy with secret-named keys and any credential value replaced by ***."""
    secrets = secret_values() if secrets is None else secrets
    if isinstance(value, dict):
        return {
            k: REDACTED if SECRET_KEY.search(str(k)) and v else redact(v, secrets)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return type(value)(redact(v, secrets) for v in value)
    if isinstance(value, str):
        for secret in secrets:
            value = value.replace(secret, REDACTED)
        # command-line overrides, alone or comma-joined (Hydra's override_dirname)
        value = SECRET_OVERRIDE.sub(rf"\1{REDACTED}", value)
    return value


def scrub_yaml_file(path: Path) -> None:
    """Redact a YAML file written before vitrain ran (Hydra's .hydra/*.yaml), keeping its shape."""
    import yaml

    data = yaml.safe_load(path.read_text())
    clean = redact(data)
    if clean != data:
        path.write_text(yaml.safe_dump(clean, sort_keys=False))


@contextlib.contextmanager
def redacted_argv() -> Iterator[None]:
    """sys.argv without credentials while a logger records it (wandb keeps the program's args);
    restored after, since Lightning re-launches DDP ranks from it."""
    saved = sys.argv
    sys.argv = redact(list(saved))
    try:
        yield
    finally:
        sys.argv = saved
