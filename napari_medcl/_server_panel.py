"""The segmentation widget's "Where to run" panel: *This computer* (the default) or a medcl-serve *Server*.

Qt only: what is remembered and how a server's models are used is ``napari_medcl.server_connection``. The
panel reads the remembered choice when the widget opens, and remembers it again whenever the user connects
or runs on the server.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from magicgui.widgets import ComboBox, Container, Label, LineEdit, PushButton

from napari_medcl.errors import MedclError, UsageError
from napari_medcl.server_connection import (
    SERVER,
    THIS_COMPUTER,
    SavedServer,
    ServerConnection,
    load_saved_server,
    save_server,
)


class ServerPanel(Container):
    """``on_server``: whether runs go to the server; ``model_for(name)``: the server's model for a run;
    ``served``: the names the server listed at the last Connect. ``on_change()`` is called when the choice
    or the list of served models changes."""

    def __init__(self, on_change: Callable[[], None]):
        saved = load_saved_server()
        self._on_change = on_change
        self._where = ComboBox(label="Where to run", choices=[THIS_COMPUTER, SERVER], value=saved.where)
        self._where.tooltip = (
            "This computer: the image never leaves it. Server: the image's voxels and geometry (no file name, "
            "no DICOM header) go to a medcl-serve server, which runs the model."
        )
        self._url = LineEdit(label="Server URL", value=saved.url)
        self._token = LineEdit(label="Token", value=saved.token)
        from qtpy.QtWidgets import QLineEdit

        self._token.native.setEchoMode(QLineEdit.EchoMode.Password)
        self._connect = PushButton(text="Connect")
        self._info = Label(value="")
        self._info.native.setWordWrap(True)
        super().__init__(
            widgets=[self._where, self._url, self._token, self._connect, self._info], labels=True
        )
        self.margins = (0, 0, 0, 0)
        self._connection: ServerConnection | None = None
        self.served: dict[str, Any] = {}
        self._where.changed.connect(self._on_where)
        self._connect.changed.connect(self._on_connect)
        for edit in (self._url, self._token):
            edit.changed.connect(self._forget_connection)
        self._show_server_fields()

    @property
    def on_server(self) -> bool:
        return self._where.value == SERVER

    def run_key(self) -> str:
        """What identifies where a run goes, for the widget's reuse of a loaded model."""
        return f"server {self._url.value.strip()}"

    def model_for(self, name: str) -> Any:
        """The server's model ``name`` (a ``RemoteModel``); UsageError without a URL or for a local file."""
        model = self._connection_now().model(name)
        self._remember()
        return model

    def connect(self) -> list[str]:
        """Ask the server for its models; show and return their names (MedclError, one line, on failure)."""
        connection = self._connection_now()
        specs = connection.client.models()
        self.served = specs
        self._info.value = f"Connected to {connection.url}: {', '.join(specs) or 'no models'}."
        self._remember()
        self._on_change()
        return list(specs)

    def set_running(self, running: bool) -> None:
        for widget in (self._where, self._url, self._token, self._connect):
            widget.enabled = not running

    def _connection_now(self) -> ServerConnection:
        if self._connection is None:
            if not self._url.value.strip():
                raise UsageError(
                    "Server: enter the server's URL (e.g. https://seg.example.org), then Connect."
                )
            self._connection = ServerConnection(self._url.value, self._token.value)
        return self._connection

    def _forget_connection(self, *_: Any) -> None:
        if self._connection is not None:
            self._connection.close()
        self._connection, self.served = None, {}
        self._info.value = ""

    def _remember(self) -> None:
        saved = SavedServer(
            where=self._where.value, url=self._url.value.strip(), token=self._token.value.strip()
        )
        try:
            save_server(saved)
        except MedclError as error:
            self._info.value = str(error)

    def _on_where(self, *_: Any) -> None:
        self._show_server_fields()
        self._remember()
        self._on_change()

    def _on_connect(self, *_: Any) -> None:
        try:
            self.connect()
        except MedclError as error:
            self._info.value = str(error)

    def _show_server_fields(self) -> None:
        for widget in (self._url, self._token, self._connect, self._info):
            widget.visible = self.on_server
