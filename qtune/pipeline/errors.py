"""The error every job raises for a problem the user can fix: the CLI prints it as one line."""

from __future__ import annotations


class PipelineError(RuntimeError):
    """The job could not run or produced nothing usable; the message says why and what to do."""
