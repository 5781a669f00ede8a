"""The bottom of the package: the user-facing error and the one-line notice every other module may raise or print.

It imports nothing from `llmkd`, so any module can use it; `llmkd.infra.artifacts` re-exports both names, which is
where the rest of the code imports them from.
"""

from __future__ import annotations

import sys


class LlmkdError(Exception):
    """A problem with the user's input (file, field, config or artifact); printed as one line."""


def notice(message: str) -> None:
    """One line to stderr about something the run did on the user's behalf (a recovery, a lock)."""
    print(f"llmkd: {message}", file=sys.stderr, flush=True)
