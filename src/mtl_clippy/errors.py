"""Exceptions for user mistakes: the command-line app prints their message, without a
traceback, and exits with status 2."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value is invalid or two options cannot be combined.

    The message names the config key (e.g. ``optim.lr``) and says what to do.
    """


def user_error_types() -> tuple[type[BaseException], ...]:
    """Exception types that are the user's to fix (bad data, bad configuration)."""
    from omegaconf.errors import MissingMandatoryValue

    from mtl_clippy.data.errors import DataError

    return (ConfigError, DataError, MissingMandatoryValue, FileNotFoundError, PermissionError)
