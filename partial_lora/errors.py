"""User-facing errors: the entry point prints their message as one sentence, with no stack trace."""

import threading

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


class SettingError(ConfigError):
    """A setting given to the core is invalid, named as the caller wrote it: ``owner`` is the settings class or
    function called (``DerivationSettings``, ``apply_losia``), ``setting`` its field or argument.

    The core is a library and its callers never see a YAML key; the harness, whose users set YAML keys, renames
    the setting with :meth:`naming` (``partial_lora.settings.yaml_terms``). A ``ConfigError``, so that code
    catching those needs no change.
    """

    def __init__(self, owner: str, setting: str, requirement: str, value: object) -> None:
        self.owner, self.setting, self.requirement, self.value = owner, setting, requirement, value
        super().__init__(self.naming(f"{owner}.{setting}"))

    def naming(self, name: str) -> str:
        """The message with the setting called ``name``: "<name> <requirement>, got <value>."."""
        return f"{name} {self.requirement}, got {self.value!r}."


def check_choice(owner: str, setting: str, value: object, choices: tuple[str, ...]) -> None:
    """Raise :class:`SettingError` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise SettingError(owner, setting, f"must be one of {', '.join(choices)}", value)


class DataError(PartialLoraError):
    """Data is missing or malformed."""


class StorageError(PartialLoraError):
    """A record, checkpoint or lock could not be written safely (disk full, quota, a planted link)."""


class RunInterrupted(BaseException):
    """SIGTERM stopped the run; a relaunch resumes it. Its message is one sentence, as a user error's.

    Not an ``Exception``, as ``KeyboardInterrupt`` is not: raised from a signal handler, it must pass the
    ``except Exception`` of whatever code it interrupts (a data loader's, a checkpoint check's)."""


# Set by run.py's SIGTERM handler as it raises RunInterrupted. Code that catches every exception can swallow that
# raise (datasets' fingerprinting wraps dill in a bare ``except:``), and Lightning's own handler, installed later in
# the fit, starts from "no SIGTERM"; the fit honours this at its first batch instead (``SigtermCheckpoint``).
SIGTERM_PENDING = threading.Event()


class TrainingDiverged(PartialLoraError):
    """The training loss stopped being finite; ``step`` is the optimiser step it happened at."""

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step
