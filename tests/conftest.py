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
