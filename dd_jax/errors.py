"""The errors dd_jax raises for bad input (each message names the problem and the fix), and the
near-match hint they share."""
from __future__ import annotations

import contextlib
import difflib
import logging
from typing import Iterable, Iterator


class DDJaxError(Exception):
    """Base class: the CLI prints these as one line and exits non-zero."""


class ConfigError(DDJaxError, ValueError):
    """A config value, flag or argument that cannot work."""


class DataError(DDJaxError):
    """A dataset that is missing, unreadable or corrupted."""


class DivergedError(DDJaxError, FloatingPointError):
    """The meta-loss became NaN or infinite."""


def did_you_mean(name: str, choices: Iterable[str], prefix: str = "") -> str:
    """' (did you mean A, B?)': up to three of `choices` close to `name`, each written with
    `prefix` (e.g. '--'); '' when none is close."""
    near = difflib.get_close_matches(name, list(choices), n=3)
    return f" (did you mean {', '.join(prefix + n for n in near)}?)" if near else ""


@contextlib.contextmanager
def absl_logging_off() -> Iterator[None]:
    """Silences what tensorflow-datasets and orbax log through absl on stderr (warnings, and
    errors they recover from, such as an unparsable informational metadata file): dd_jax
    reports what goes wrong itself, as one error line."""
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        absl.setLevel(level)
