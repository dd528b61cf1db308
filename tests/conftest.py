"""Fixtures shared by several test modules."""

from __future__ import annotations

import pytest


@pytest.fixture
def one_torch_thread():
    """Tiny tensors: a second intra-op thread only adds wake-up latency (seconds on a loaded machine)."""
    import torch  # here, not at the top: most test modules never import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def private_config_folder(tmp_path_factory, monkeypatch):
    """The widget remembers its "Where to run" choice in the user's config folder: tests never read or
    write the real one (a developer's remembered server would send the widget tests' images there)."""
    folder = tmp_path_factory.mktemp("config")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(folder))
    monkeypatch.setenv("APPDATA", str(folder))


@pytest.fixture(autouse=True)
def locale_restored():
    """SimpleITK's DICOM writer (GDCM), which tests use to make DICOM series, switches the process to the C
    locale; put the locale back so that a later test's text I/O does not depend on which tests ran first."""
    import locale

    saved = locale.setlocale(locale.LC_ALL)
    yield
    locale.setlocale(locale.LC_ALL, saved)
