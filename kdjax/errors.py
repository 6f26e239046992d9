"""The errors kdjax raises for things a user can fix."""


class KdjaxError(Exception):
    """Base for user-facing errors; the CLI prints the message and exits non-zero."""


class ConfigError(KdjaxError, ValueError):
    """A config field holds a value kdjax cannot use; the message names the field and the fix."""


class DataError(KdjaxError, ValueError):
    """The data cannot be found, read, or does not fit the models."""


class WorkdirError(KdjaxError):
    """The work directory holds an earlier run that would be overwritten."""


class CheckpointError(KdjaxError):
    """A checkpoint on disk is corrupted or does not fit the run; the message names it."""


class Interrupted(KdjaxError):
    """A signal stopped the run at a step boundary, after a checkpoint; rerun to resume."""


class NonFiniteError(KdjaxError):
    """A loss term or the gradient went NaN or infinite; the message names the term and step."""
