"""The errors kdjax raises for things a user can fix."""


class KdjaxError(Exception):
    """Base for user-facing errors; the CLI prints the message and exits non-zero."""


class ConfigError(KdjaxError, ValueError):
    """A config field holds a value kdjax cannot use; the message names the field and the fix."""


class DataError(KdjaxError, ValueError):
    """The data cannot be found, read, or does not fit the models."""


class WorkdirError(KdjaxError):
    """The work directory holds an earlier run that would be overwritten."""
