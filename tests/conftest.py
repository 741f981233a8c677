"""Shared test setup: an isolated cache directory and small helpers."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Keep SVD caches and the demo backbone of tests out of the user's ~/.cache."""
    if "MASM_TEST_CACHE_DIR" in os.environ:  # lets a developer reuse a warm cache between runs
        os.environ["MASM_CACHE_DIR"] = os.environ["MASM_TEST_CACHE_DIR"]
    else:
        os.environ["MASM_CACHE_DIR"] = str(tmp_path_factory.mktemp("masm-cache"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    yield
