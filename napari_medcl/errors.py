"""The one family of user errors, for the plugin, training and export alike.

Every mistake a user can make and fix (a bad file, option, config, dataset, checkpoint or model) raises a
``MedclError`` whose message is one line naming the file or option and the problem: the command lines print
``str(error)`` and exit non-zero, the napari widget shows it under its Run button. The command lines and the
widget catch ``MedclError`` alone. Anything else is a bug in napari-medcl, never the user's input: they say
"internal error" and where its traceback was logged (``napari_medcl.crash_log``).

The subclasses in ``training`` and ``export`` (ConfigError, DatasetError, RunError, TrainingError,
CheckpointError, ExportError) and ``napari_medcl.spec.SpecError`` derive from ``MedclError`` too.
"""

from __future__ import annotations

from pathlib import Path


class MedclError(Exception):
    """Base class of the errors a user can cause and fix (bad file, bad option, bad model)."""


class UsageError(MedclError, ValueError):
    """An option or argument has a value the product cannot use (an overlap of 1.5, a region outside the
    image, ``--device cuda`` without a GPU). The message names the option."""


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


class ServerError(MedclError, RuntimeError):
    """A medcl-serve server refused a request, could not be reached, or stopped in the middle of one
    (``napari_medcl.remote``). The message is one line saying which server and what happened; no result
    of the failed request is kept."""


class Cancelled(MedclError):
    """The user cancelled a running prediction; nothing was written or added."""


class InputWarning(UserWarning):
    """An input was read, but something about it deserves the user's attention (e.g. a NIfTI header that
    declares no orientation). The message is one line naming the file."""
