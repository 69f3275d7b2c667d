"""User errors: a problem with what the user gave (config, paths, data), as opposed to a bug in raydseg.

Every entry point prints a user error as `error: ...` lines without a traceback and exits with status 2
(`raydseg.cli.guarded`); any other exception is internal and keeps its traceback.
"""
from __future__ import annotations


class UserError(Exception):
    """One or more problems, each a line that names the key or path at fault."""

    def __init__(self, problems: str | list[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class ConfigError(UserError, ValueError):
    """A config file or override names an unknown key, gives a value of the wrong type or out of range, or breaks a
    rule between fields."""


class InputError(UserError):
    """An input path is missing, unreadable or holds nothing usable (no frames, no shards, no images)."""


class StorageError(UserError, OSError):
    """A storage operation failed for good (after S3's retries): permission, missing bucket, endpoint down, disk
    full. Its line names the path."""
