"""Exceptions a user can cause. The CLI turns them into a one-line message and exit code 2."""

from __future__ import annotations


class BertscaleError(Exception):
    """A user-caused error: bad input, bad config, a missing file. The message says what to do."""


class ConfigError(BertscaleError):
    """An invalid configuration value or a known-bad combination of values."""


class InputError(BertscaleError):
    """Input data that cannot be used: missing path, empty glob, nothing left after filtering."""
