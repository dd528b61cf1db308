"""The models a server serves, loaded once at start-up, by the names clients use.

``--models`` takes folders (every ``.onnx`` file in it, named by its file name without ``.onnx``) and bundled
model names; without it the server serves the bundled models. A client names a model, never a file: a name
is looked up here and nowhere else, so no request can make the server open a path.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from napari_medcl.errors import ModelError, UsageError
from napari_medcl.session import InferenceSession

# What a served name looks like: no separators, no ".." and no leading dot, so a name can never be a path.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}")


@dataclass(frozen=True)
class ServedModels:
    """``sessions``: name -> loaded model, in the order given; ``default``: the name used when a client
    names none (the bundled default when it is served, else the first)."""

    sessions: dict[str, InferenceSession]
    default: str

    @property
    def names(self) -> list[str]:
        return list(self.sessions)

    def describe(self) -> list[dict[str, Any]]:
        """Name, spec (``ModelSpec.to_dict``), SHA-256 and where it runs (e.g. ``CUDAExecutionProvider``) of
        each model, for ``GET /models``."""
        return [
            {"name": name, "sha256": model.sha256, "provider": model.provider, "spec": model.spec.to_dict()}
            for name, model in self.sessions.items()
        ]


def load_served_models(
    entries: list[str] | None, *, device: str, backend: str = "auto", precision: str = "auto"
) -> ServedModels:
    """Load every model ``entries`` name (folders of .onnx files, bundled names; None: all bundled models)
    on ``device`` with ``backend`` at ``precision`` (see ``load_model``). ModelError or UsageError (one line) for a missing folder, an unknown bundled name, a file
    that is not a valid model, or two models with the same name."""
    from napari_medcl.onnx_session import bundled_models, default_model_name, load_model

    sources: list[tuple[str, str | Path]] = []
    for entry in entries or [m["name"] for m in bundled_models()]:
        folder = Path(entry).expanduser()
        if folder.is_dir():
            files = sorted(folder.glob("*.onnx"))
            if not files:
                raise UsageError(f"--models: folder {folder} holds no .onnx file")
            sources += [(file.name.removesuffix(".onnx"), file) for file in files]
        elif NAME_PATTERN.fullmatch(entry) and not entry.endswith(".onnx"):
            sources.append((entry, entry))  # a bundled name; load_model says when there is none
        else:
            raise UsageError(f"--models: {entry!r} is neither a folder nor a bundled model name")
    if not sources:
        raise UsageError("no model to serve: pass --models FOLDER or a bundled model name")
    sessions: dict[str, InferenceSession] = {}
    for name, source in sources:
        if not NAME_PATTERN.fullmatch(name):
            raise ModelError(
                source, f"{name!r} cannot be a served model name (letters, digits, . _ + - only)"
            )
        if name in sessions:
            raise UsageError(f"--models: two models are named {name!r}; rename one of the files")
        sessions[name] = load_model(source, device=device, backend=backend, precision=precision)
    try:
        bundled_default = default_model_name()
    except ModelError:
        bundled_default = None
    default = bundled_default if bundled_default in sessions else next(iter(sessions))
    return ServedModels(sessions=sessions, default=default)
