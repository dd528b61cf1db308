"""Package namespaces whose public names are imported on first use (PEP 562 module ``__getattr__``).

``import napari_medcl`` must stay fast and free of onnxruntime, SimpleITK and torch (napari imports every
plugin's package at start-up), and ``medcl-evaluate`` on an ONNX model must run without torch; the packages
``napari_medcl``, ``training.data`` and ``export`` therefore name their exports here instead of importing them.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any


def lazy_exports(
    package: str, exports: Mapping[str, str], public: Sequence[str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``: ``exports`` maps each lazy name to the module defining it;
    a name is imported on first access and then kept in the package's namespace. ``public`` is ``__all__``."""

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(public)

    return __getattr__, __dir__
