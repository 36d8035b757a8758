"""The errors that travel from the database layer to the CLI and the HTTP API.

Each says, in words a user can act on, what is wrong; the CLI prints it (exit 2, or 1
for NotFound), the API answers it (422, 409 or 404).
"""

from __future__ import annotations

__all__ = ["Conflict", "Invalid", "LimitReached", "NotFound"]


class Invalid(ValueError):
    """Input that breaks a rule of the contract; the message names the rule."""


class LimitReached(Invalid):
    """The account already has the most webhooks allowed."""


class NotFound(LookupError):
    """No such webhook or delivery (or not the asker's)."""


class Conflict(Invalid):
    """Valid input that the current state does not allow, e.g. replaying a delivery that
    is still pending."""
