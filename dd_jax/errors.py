"""The errors dd_jax raises for bad input: each message names the problem and the fix."""


class DDJaxError(Exception):
    """Base class: the CLI prints these as one line and exits non-zero."""


class ConfigError(DDJaxError, ValueError):
    """A config value, flag or argument that cannot work."""


class DataError(DDJaxError):
    """A dataset that is missing, unreadable or corrupted."""


class DivergedError(DDJaxError, FloatingPointError):
    """The meta-loss became NaN or infinite."""
