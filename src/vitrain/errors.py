"""Errors a user can cause and fix from the command line."""

import os


class UserError(Exception):
    """A bad setting or missing input: the message names the value and the fix.

    train.py prints it as one line and exits with code 2, without a traceback.
    """


class Preempted(Exception):
    """The run was stopped by SIGTERM/SIGUSR1 after saving a checkpoint; exit 143 (128 + 15)."""

    exit_code = 143


def docker_hint(fix: str) -> str:
    """The sentence " In Docker: <fix>" inside vitrain's images (they set VITRAIN_IMAGE), else
    "": there a path is one inside the container, and the fix is usually the host folder
    mounted at it."""
    if not os.environ.get("VITRAIN_IMAGE"):
        return ""
    return f" In Docker (user id {os.getuid()}): {fix} (docs/docker.md)."
