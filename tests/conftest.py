"""Shared fixtures: every behaviour test runs on both dispatch cores."""

from __future__ import annotations

import pytest

import pidbox
from pidbox import _core

CORES = [
    pytest.param(
        _core.compiled, id='c',
        marks=pytest.mark.skipif(
            _core.compiled is None,
            reason='compiled core not loaded (PIDBOX_NO_EXTENSIONS set, '
                   'or the extension was not built)')),
    pytest.param(_core.pure, id='py'),
]


@pytest.fixture(params=CORES)
def core(request, monkeypatch):
    """The dispatch core module under test; every new Node decides with it."""
    monkeypatch.setattr(pidbox.Node, 'dispatch_core', request.param)
    return request.param


@pytest.fixture
def memory_connection():
    from kombu import Connection
    conn = Connection('memory://',
                      transport_options={'polling_interval': 0.01})
    try:
        yield conn
    finally:
        conn.release()
