"""Errors a user can cause and fix from the command line."""


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
