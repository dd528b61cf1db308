"""Exceptions the product raises for user mistakes.

Each one carries a message meant to be printed as a single line: the CLI prints ``str(error)`` and exits
non-zero, the napari widget shows it in a message box. Anything that is not a ``MedclError`` is a bug.
"""

from __future__ import annotations

from pathlib import Path


class MedclError(Exception):
    """Base class of the errors a user can cause and fix (bad file, bad option, bad model)."""


class InputError(MedclError, ValueError):
    """An input image (or folder) cannot be read or is not usable. The message names the file."""

    def __init__(self, path: str | Path | None, problem: str):
        self.path = None if path is None else Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path is not None else problem)


class ModelError(MedclError, ValueError):
    """A model file is missing, unsafe, or does not follow the ONNX/ModelSpec contract. The message names it."""

    def __init__(self, path: str | Path | None, problem: str):
        self.path = None if path is None else Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path is not None else problem)


class OutputError(MedclError, OSError):
    """An output cannot be written (read-only folder, disk full, path is a folder). Old files stay intact."""

    def __init__(self, path: str | Path, problem: str):
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class OutputFormatError(OutputError, ValueError):
    """The volume cannot be stored in the chosen output format (wrong dtype or shape, two-file format,
    geometry the format cannot hold). Nothing is written."""


class PredictionError(MedclError, RuntimeError):
    """Inference produced something unusable (NaN/Inf in the model output) for one case."""


class Cancelled(MedclError):
    """The user cancelled a running prediction; nothing was written or added."""


class InputWarning(UserWarning):
    """An input was read, but something about it deserves the user's attention (e.g. a NIfTI header that
    declares no orientation). The message is one line naming the file."""
