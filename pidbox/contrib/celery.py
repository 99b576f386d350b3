"""Celery remote control on pidbox.

``Celery(..., control='pidbox.contrib.celery:Control')`` makes both ends of
the app's remote control run on :class:`pidbox.Mailbox`: the client side
(``app.control``, ``celery inspect``/``celery control``) and the workers'
nodes, which Celery builds with ``app.control.mailbox.Node(...)``.  The wire
format is kombu's, so such workers and clients mix freely with stock ones.
"""

from __future__ import annotations

try:
    from celery.app import control as _celery_control
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError(
        'pidbox.contrib.celery needs Celery, which is an optional extra of '
        'pidbox: install it with `pip install "pidbox[celery]"` '
        f'(import failed: {exc})') from exc

from pidbox import Mailbox

__all__ = ('Control', 'Inspect', 'Mailbox')

Inspect = _celery_control.Inspect


class Control(_celery_control.Control):
    """Celery's remote control client, with :class:`pidbox.Mailbox`."""

    Mailbox = Mailbox
