"""User-facing errors: the entry point prints their message as one sentence, with no stack trace."""


class PartialLoraError(Exception):
    """A problem the user can fix (configuration, data); its message says how."""


class ConfigError(PartialLoraError):
    """A configuration value is invalid."""


class DataError(PartialLoraError):
    """Data is missing or malformed."""
