"""The napari widget's *Server* choice without Qt: the remembered server, and the models it serves.

The widget runs on *This computer* unless the user picks *Server*: many sites may not send images to another
machine, so nothing leaves it by default. The server's URL and token, and which of the two was picked last,
are remembered in ``<config>/napari-medcl/server.json`` (``$XDG_CONFIG_HOME`` or ``~/.config``;
``%APPDATA%`` on Windows), readable by the user only, since it holds the token. It is read when the widget
opens, never at import.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path

from napari_medcl.errors import OutputError, UsageError
from napari_medcl.remote import RemoteClient, RemoteModel

THIS_COMPUTER, SERVER = "This computer", "Server"
# Seconds to wait for a server when listing its models from the widget (on the GUI thread).
CONNECT_TIMEOUT = 10.0


@dataclass(frozen=True)
class SavedServer:
    """What the widget remembers: ``where`` (THIS_COMPUTER or SERVER), the server's ``url`` and ``token``."""

    where: str = THIS_COMPUTER
    url: str = ""
    token: str = ""


def settings_path() -> Path:
    """Where the choice is remembered (see the module docstring)."""
    if os.name == "nt" and os.environ.get("APPDATA"):
        base = Path(os.environ["APPDATA"])
    else:
        base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "napari-medcl" / "server.json"


def load_saved_server(path: Path | None = None) -> SavedServer:
    """The remembered choice; the default (this computer, no server) when there is none or it is unreadable."""
    path = settings_path() if path is None else path
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        saved = SavedServer(**{key: str(data[key]) for key in ("where", "url", "token") if key in data})
    except (OSError, ValueError, TypeError):
        return SavedServer()
    return saved if saved.where in (THIS_COMPUTER, SERVER) else SavedServer()


def save_server(saved: SavedServer, path: Path | None = None) -> Path:
    """Remember ``saved`` (atomically, in a file only its user can read); OutputError when it cannot be."""
    path = settings_path() if path is None else path
    temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Created with mode 600 from the start: the token is never readable by others, even for a moment.
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            json.dump(asdict(saved), file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except OSError as error:
        temp.unlink(missing_ok=True)
        raise OutputError(path, f"cannot remember the server ({error.strerror or error})") from None
    return path


class ServerConnection:
    """The models of one server, as the widget uses them: ``model_names()`` lists them (asking the server),
    ``model(name)`` gives a ``RemoteModel`` that keeps each image's session between runs (so a second run on
    the same image, whole or by regions, uploads nothing)."""

    def __init__(self, url: str, token: str):
        if not url.strip():
            raise UsageError("Server: enter the server's URL (e.g. https://seg.example.org).")
        self.client = RemoteClient(url, token or None, timeout=CONNECT_TIMEOUT)
        self._models: dict[str, RemoteModel] = {}

    @property
    def url(self) -> str:
        return self.client.url

    def model_names(self) -> list[str]:
        """The served models' names (ServerError, one line, when the server cannot be asked)."""
        return list(self.client.models())

    def model(self, name: str) -> RemoteModel:
        if Path(name).suffix == ".onnx" or os.sep in name:
            raise UsageError(
                "A model file on this computer cannot run on the server: choose one of the server's models."
            )
        if name not in self._models:
            self._models[name] = RemoteModel(self.client, name)
        return self._models[name]

    def close(self) -> None:
        """Close every session this connection opened on the server."""
        for model in self._models.values():
            model.close()
        self._models.clear()
