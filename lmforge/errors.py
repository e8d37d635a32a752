"""The errors a user can cause, as one family.

Everything lmforge raises because of what it was given (a config key, a file, a checkpoint, a
plugin's arguments) is a :class:`UserError`: the command line prints it as one line, names the
file, line or key and what to do, and exits with code 2. Any other exception is a bug (in lmforge
or in a plugin) and the command line shows its traceback.

:class:`UserError` is a ``ValueError``, and the two file errors are also ``FileNotFoundError`` and
``FileExistsError``, so code that catches the built-in types keeps working.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input: printed as one line (``lmforge: error: ...``), exit code 2."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named does not exist."""


class ExistingPathError(UserError, FileExistsError):
    """A file or folder lmforge would create already exists."""


class CheckpointError(UserError):
    """A checkpoint that cannot be used: missing, unreadable, refused (it would run code), or not lmforge's."""


class TrainingInterrupted(SystemExit):
    """``fit`` stopped by SIGINT or SIGTERM after saving a checkpoint; the process exits with 128 + the signal
    number (130 for SIGINT, 143 for SIGTERM), so a scheduler never records an interrupted run as a success."""

    def __init__(self, signum: int, step: int, checkpoint: str | None, rank_zero: bool = True) -> None:
        import signal

        super().__init__(128 + signum)
        self.rank_zero = rank_zero
        """Whether this process is the first of the run (the one that reports)."""
        self.signum = signum
        self.signal_name = signal.Signals(signum).name
        self.step = step
        self.checkpoint = checkpoint

    def describe(self) -> str:
        if self.checkpoint is None:
            return f"{self.signal_name} at step {self.step}; no checkpoint was saved"
        return (
            f"{self.signal_name} at step {self.step}: saved {self.checkpoint}; "
            "continue the run with the same command and --ckpt_path last"
        )
