"""Model registry: ``@register_model(name, spatial_dims=...)`` and ``create_model(name, ...)`` (timm style)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

__all__ = ["ModelEntry", "create_model", "get_model_entry", "list_models", "register_model"]


@dataclass(frozen=True)
class ModelEntry:
    name: str
    builder: Callable[..., nn.Module]
    spatial_dims: tuple[int, ...]

    def accepted_kwargs(self) -> tuple[str, ...]:
        """Keyword arguments the builder takes besides spatial_dims/in_channels/num_classes."""
        params = inspect.signature(self.builder).parameters
        fixed = {"self", "spatial_dims", "in_channels", "num_classes"}
        return tuple(n for n, p in params.items() if n not in fixed and p.kind is not p.VAR_KEYWORD)


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(name: str, *, spatial_dims: tuple[int, ...] = (2, 3)):
    """Decorator registering a model class or builder under ``name`` for the given spatial dims."""

    def decorate(builder):
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = ModelEntry(name, builder, tuple(spatial_dims))
        return builder

    return decorate


def list_models(spatial_dims: int | None = None) -> list[str]:
    """Sorted registered names, optionally only those that support ``spatial_dims``."""
    return sorted(n for n, e in _REGISTRY.items() if spatial_dims is None or spatial_dims in e.spatial_dims)


def get_model_entry(name: str) -> ModelEntry:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; available models: {', '.join(list_models())}") from None


def create_model(name: str, *, spatial_dims: int, in_channels: int, num_classes: int, **kwargs) -> nn.Module:
    """Build a registered model. Keyword arguments that are None are dropped, so unset options keep the
    model's defaults; unknown ones raise a ValueError naming them and the accepted ones."""
    entry = get_model_entry(name)
    if spatial_dims not in entry.spatial_dims:
        raise ValueError(
            f"model {name!r} supports spatial_dims {entry.spatial_dims}, got spatial_dims={spatial_dims!r}"
        )
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    accepted = entry.accepted_kwargs()
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(
            f"model {name!r} does not accept {', '.join(unknown)}; accepted options: {', '.join(accepted)}"
        )
    return entry.builder(
        spatial_dims=spatial_dims, in_channels=in_channels, num_classes=num_classes, **kwargs
    )
