"""Errors a user can cause and fix from the command line."""

import errno
import os

# "No space left on device" and "Disk quota exceeded": a full disk, whoever filled it.
FULL_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class UserError(Exception):
    """A bad setting or missing input: the message names the value and the fix.

    train.py prints it as one line and exits with code 2, without a traceback.
    """


class Preempted(Exception):
    """The run was stopped by a signal (after saving a checkpoint, where the run saves them);
    train.py exits with `exit_code`: 143 for SIGTERM and SIGUSR1, 130 for SIGINT."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def docker_hint(fix: str) -> str:
    """The sentence " In Docker: <fix>" inside vitrain's images (they set VITRAIN_IMAGE), else
    "": there a path is one inside the container, and the fix is usually the host folder
    mounted at it."""
    if not os.environ.get("VITRAIN_IMAGE"):
        return ""
    return f" In Docker (user id {os.getuid()}): {fix} (docs/docker.md)."


def full_disk(err: BaseException | None) -> OSError | None:
    """The full-disk OSError behind err, if there is one: torch.save turns it into a
    RuntimeError, Lightning chains further errors onto it."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in FULL_DISK_ERRNOS:
            return err
        err = err.__cause__ or err.__context__
    return None
