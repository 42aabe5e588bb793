"""Shared fixtures. Helpers for the reference folder live in ``reference.py``, for the CLI in ``helpers.py``."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def two_threads():
    """Run a module's tests with 2 torch threads, the setting the reference vectors were made with."""
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)
