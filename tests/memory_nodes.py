"""Helpers for tests that run nodes on kombu's in-memory transport."""

from __future__ import annotations

import logging
import queue
import re
import socket
import threading
import time

from kombu import Connection, Producer
from kombu.utils.uuid import uuid

#: generous: these machines are shared and noisy
DEADLINE = 10.0


def unique(prefix='kc'):
    """A namespace/hostname no other test (or earlier run) has used."""
    return f'{prefix}{uuid().replace("-", "")[:16]}'


def fresh_connection():
    return Connection('memory://',
                      transport_options={'polling_interval': 0.01})


def publish_raw(bound, body, content_type='application/json',
                content_encoding='utf-8', headers=None):
    """Publish ``body`` as it is to ``bound``'s exchange (no serializer)."""
    producer = Producer(bound.connection.default_channel)
    bound.exchange(producer.channel).declare()
    producer.publish(body, exchange=bound.exchange.name, routing_key='',
                     content_type=content_type,
                     content_encoding=content_encoding,
                     headers=headers or {})


def warning_texts(caplog, level=logging.WARNING):
    return [r.getMessage() for r in caplog.records if r.levelno >= level]


def names_field(caplog, field):
    """True if some log line says the request was malformed in ``field``."""
    rx = re.compile(rf'\b{re.escape(field)}\b')
    return any('malformed' in text.lower() and rx.search(text)
               for text in warning_texts(caplog))


class NodeServer:
    """Run pidbox/kombu nodes in a thread on their own memory:// connection.

    ``setup(connection)`` runs in the thread, starts the consumers and
    returns whatever the test wants back (``server.value``).
    """

    def __init__(self, setup):
        self.setup = setup
        self.value = None
        self.error = None
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name='pidbox-test-node')

    def _run(self):
        try:
            with fresh_connection() as conn:
                self.value = self.setup(conn)
                self._ready.set()
                while not self._stop.is_set():
                    try:
                        conn.drain_events(timeout=0.05)
                    except socket.timeout:
                        pass
        except BaseException as exc:  # noqa: B036 - reported to the test
            self.error = exc
        finally:
            self._ready.set()

    def __enter__(self):
        self._thread.start()
        assert self._ready.wait(DEADLINE), 'node thread did not start'
        if self.error is not None:
            raise self.error
        return self

    def __exit__(self, *exc_info):
        self._stop.set()
        self._thread.join(DEADLINE)
        assert not self._thread.is_alive(), 'node thread did not stop'
        if self.error is not None and exc_info[0] is None:
            raise self.error


def by_host(replies):
    merged = {}
    for reply in replies:
        assert isinstance(reply, dict) and len(reply) == 1, reply
        merged.update(reply)
    return merged


def drain_queue(q):
    items = []
    while True:
        try:
            items.append(q.get_nowait())
        except queue.Empty:
            return items


def serve(conn, seconds=0.5):
    """Drain events for a while (nodes and callers share one connection)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            conn.drain_events(timeout=0.02)
        except OSError:
            pass
