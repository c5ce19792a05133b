"""User-facing errors: the entry point prints their message as one sentence, with no stack trace."""

# Exit status of a command whose runs all ended, some with a failed record (NaN loss): apart from bad input (2)
# and crashes (1), so that scripts can tell them apart.
RUNS_FAILED_EXIT = 3
# Exit status of a command stopped by SIGTERM (preemption, a time limit): 128 + 15, what a shell reports for a
# process that SIGTERM ended, so schedulers and scripts read it as a stop, not a success or a crash.
INTERRUPTED_EXIT = 143


class PartialLoraError(Exception):
    """A problem the user can fix (configuration, data); its message says how."""


class ConfigError(PartialLoraError):
    """A configuration value is invalid."""


class DataError(PartialLoraError):
    """Data is missing or malformed."""


class StorageError(PartialLoraError):
    """A record, checkpoint or lock could not be written safely (disk full, quota, a planted link)."""


class RunInterrupted(BaseException):
    """SIGTERM stopped the run; a relaunch resumes it. Its message is one sentence, as a user error's.

    Not an ``Exception``, as ``KeyboardInterrupt`` is not: raised from a signal handler, it must pass the
    ``except Exception`` of whatever code it interrupts (a data loader's, a checkpoint check's)."""


class TrainingDiverged(PartialLoraError):
    """The training loss stopped being finite; ``step`` is the optimiser step it happened at."""

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step
