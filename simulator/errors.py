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


class Diverged(RuntimeError):
    """A loss or parameter became NaN or inf: the run stops at once with ``status: diverged``.

    Not a bug and not bad input: a result (step sizes too large for this model, say). It says
    where: the round (GAS: global iteration), the local step within it, and the party.
    """

    def __init__(self, what: str, round: int | None = None, local_step: int | None = None, party: str = "",
                 client: int | None = None):
        # Positional arguments (and ``args`` holding all of them): SimPy re-raises an exception
        # from a process as ``type(e)(*e.args)``, which must rebuild the same error.
        super().__init__(what, round, local_step, party, client)
        self.what, self.round, self.local_step, self.party, self.client = what, round, local_step, party, client

    def __str__(self) -> str:
        where = f"round {self.round}" + (f", local step {self.local_step}" if self.local_step is not None else "")
        who = self.party + (f" (client {self.client})" if self.client is not None else "")
        return f"diverged: {self.what} is not finite at {where}, on the {who}"

    def info(self) -> dict:
        return {"what": self.what, "round": self.round, "local_step": self.local_step, "party": self.party,
                "client": self.client}


class Terminated(KeyboardInterrupt):
    """SIGTERM (a batch system, ``kill``): stops a run like Ctrl-C does, and exits 143, not 130."""
