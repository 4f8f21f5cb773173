"""The error every job raises for a problem the user can fix: the CLI prints it as one line."""

from __future__ import annotations

import sys


class PipelineError(RuntimeError):
    """The job could not run or produced nothing usable; the message says why and what to do."""


def one_line(error: BaseException) -> str:
    """An OS error as one line: errno, cause and path (``[Errno 28] No space left on device:
    '/out/x'``); the original error when Ray wrapped it, never its remote traceback."""
    ray_exceptions = sys.modules.get("ray.exceptions")
    if ray_exceptions is not None and isinstance(error, ray_exceptions.RayTaskError):
        cause = getattr(error, "cause", None)
        if isinstance(cause, BaseException):
            error = cause
    return " ".join(str(error).split())
