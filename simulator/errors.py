"""Errors a user can cause and fix: the CLI turns each into one line on stderr and exit code 2.

Library code raises these instead of printing; nothing here knows about the CLI.
"""


class UserError(Exception):
    """Bad input from the user (scenario, override, CLI flag, missing file): exit code 2."""


class ScenarioError(UserError):
    """A scenario key has a wrong name, type or value. The message starts with the dotted key."""

    def __init__(self, key: str, message: str):
        self.key = key
        self.detail = message
        super().__init__(f"{key}: {message}" if key else message)


class DatasetNotFoundError(UserError):
    """A dataset's files are not where we looked. The message says where and how to get them."""


class CostError(RuntimeError):
    """An operation could not be priced (e.g. zero FLOP/s). Never fall back to a zero cost."""
