"""Errors a user can cause and fix from the command line."""


class UserError(Exception):
    """A bad setting or missing input: the message names the value and the fix.

    train.py prints it as one line and exits with code 2, without a traceback.
    """


class Preempted(Exception):
    """The run was stopped by SIGTERM/SIGUSR1 after saving a checkpoint; exit 143 (128 + 15)."""

    exit_code = 143
