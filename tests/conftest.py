"""Shared fixtures: every test gets its own teacher cache so runs never touch ~/.cache."""

import pytest


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Point the artifact cache at a per-test temporary folder."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("TRACR_INJECTION_CACHE", str(cache))
    return cache
