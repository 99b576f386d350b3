"""pidbox: kombu's process mailbox, with its hot path compiled by Cython.

A drop-in for :mod:`kombu.pidbox`: ``from pidbox import Mailbox`` where code
said ``from kombu.pidbox import Mailbox``.  ``pidbox.IMPLEMENTATION`` tells
which dispatch core is active (``"cython"`` or ``"python"``); set
``PIDBOX_NO_EXTENSIONS=1`` to force the pure-Python one.
"""

from __future__ import annotations

# kombu's names, looked up here at call time, so that tests written for
# kombu.pidbox can patch pidbox.Producer, pidbox.Consumer and pidbox.Queue.
from kombu import Consumer, Exchange, Producer, Queue  # noqa: F401

from ._core import IMPLEMENTATION
from .exceptions import MalformedRequest
from .mailbox import REPLY_QUEUE_EXPIRES, Mailbox
from .node import W_PIDBOX_IN_USE, Node

__all__ = ('Node', 'Mailbox', 'IMPLEMENTATION', 'MalformedRequest',
           'REPLY_QUEUE_EXPIRES', 'W_PIDBOX_IN_USE')
__version__ = '0.1.0'
