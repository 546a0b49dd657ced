"""The failures a user can cause and fix: bad config values, missing inputs, mismatched
checkpoints. The command line prints their message as one line and exits with status 2
(`scm_jax.main`); any other exception is a bug and keeps its traceback.

Each subclasses the builtin its callers already expect (ValueError, FileNotFoundError), so
library code can catch either.
"""


class UserError(Exception):
    """A failure whose message says what to change; no traceback is needed to act on it."""


class ConfigError(UserError, ValueError):
    """A config key or value is invalid. The message names the key, the value and what was
    expected."""


class MissingInputError(UserError, FileNotFoundError):
    """A file the run needs is absent (a teacher checkpoint, a dataset, weights). The message
    names the path and how to create it."""


class CheckpointMismatchError(UserError, ValueError):
    """A checkpoint on disk was written by a run of a different meaning (architecture, dataset,
    objective) or cannot be read. The message names the directory and the entry that differs."""


def check(ok: bool, key: str, value, expected: str) -> None:
    """Raises ConfigError('config.<key> = <value> is invalid: expected <expected>') unless ok."""
    if not ok:
        raise ConfigError(f"config.{key} = {value!r} is invalid: expected {expected}")
