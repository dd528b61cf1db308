"""Where a bug's traceback goes: a log file the user can attach to a report, never their screen.

The command lines and the widget catch ``MedclError`` (the user's mistakes) and show its one line. Any other
exception is a bug in napari-medcl: ``log_internal_error`` writes its full traceback to a new file under the
user's cache folder and returns the path, which the caller prints or shows with the words "internal error".
"""

from __future__ import annotations

import os
import tempfile
import time
import traceback
from pathlib import Path

__all__ = ["internal_error_message"]


def log_folder() -> Path:
    """``$XDG_CACHE_HOME/napari-medcl/logs`` (``~/.cache/...`` without it)."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "napari-medcl" / "logs"


def log_internal_error(program: str, error: BaseException) -> Path | None:
    """Write ``error``'s traceback to a new ``<program>-<time>-<pid>-<random>.log`` and return its path; the system's
    temporary folder when the cache folder cannot be written; None when neither can."""
    text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for folder in (log_folder(), Path(tempfile.gettempdir())):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            # A new file every time: several cases of one run may fail within the same second.
            fd, name = tempfile.mkstemp(prefix=f"{program}-{stamp}-{os.getpid()}-", suffix=".log", dir=folder)
            with os.fdopen(fd, "w", encoding="utf-8") as file:
                file.write(f"{program}: internal error\n{text}")
            return Path(name)
        except OSError:
            continue
    return None


def internal_error_message(program: str, error: BaseException) -> str:
    """One line for an internal error: what it was and where its traceback is."""
    path = log_internal_error(program, error)
    where = f"traceback in {path}" if path is not None else "the traceback could not be logged"
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    what = f"{type(error).__name__}: {first}" if first else type(error).__name__
    return f"internal error (a bug in napari-medcl, not a problem with your input): {what}; {where}"
