"""One unbound Mailbox, many threads: every thread gets exactly its replies.

Each thread binds the shared :class:`pidbox.Mailbox` to its own connection
and makes calls with a per-thread argument; nodes run in their own threads
with their own connections.  Nothing may be lost, duplicated or handed to
another thread, and the shared ``unclaimed`` must end up empty.  Runs on
``memory://`` for both dispatch cores (the real-broker variant is in
tests/broker/test_soak.py).
"""

from __future__ import annotations

import socket
import threading
import uuid
from collections import Counter

import pytest
from kombu import Connection

import pidbox

pytestmark = pytest.mark.usefixtures('core')

THREADS = 8
CALLS = 50
NODES = ('n1', 'n2', 'n3')
TIMEOUT = 20.0   # generous: a call normally returns in milliseconds


def connect():
    return Connection('memory://',
                      transport_options={'polling_interval': 0.005})


class NodeThread(threading.Thread):
    def __init__(self, mailbox, hostname):
        super().__init__(name=f'node-{hostname}', daemon=True)
        self.mailbox = mailbox
        self.hostname = hostname
        self.seen = Counter()
        self.ready = threading.Event()
        self.stopping = threading.Event()
        self.error = None

    def handlers(self):
        def echo(state, value=None):
            self.seen[repr(value)] += 1
            return value

        def whoami(state):
            return self.hostname

        return {'echo': echo, 'whoami': whoami}

    def run(self):
        try:
            with connect() as conn:
                node = self.mailbox(conn).Node(
                    self.hostname, channel=conn.channel(),
                    handlers=self.handlers())
                consumer = node.listen()
                self.ready.set()
                try:
                    while not self.stopping.is_set():
                        try:
                            conn.drain_events(timeout=0.05)
                        except socket.timeout:
                            pass
                finally:
                    consumer.cancel()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc
            self.ready.set()


@pytest.fixture
def cluster():
    mailbox = pidbox.Mailbox(f'conc-{uuid.uuid4().hex[:8]}', type='fanout')
    threads = [NodeThread(mailbox, h) for h in NODES]
    for t in threads:
        t.start()
    for t in threads:
        assert t.ready.wait(10)
        assert t.error is None, t.error
    yield mailbox, threads
    for t in threads:
        t.stopping.set()
    for t in threads:
        t.join(10)
    assert not [t for t in threads if t.is_alive()], 'node thread hung'
    assert [t.error for t in threads if t.error] == []


def run_threads(target, count=THREADS):
    results = [None] * count
    errors = []
    barrier = threading.Barrier(count)

    def wrapper(index):
        try:
            barrier.wait(10)
            results[index] = target(index)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append((index, repr(exc)))

    threads = [threading.Thread(target=wrapper, args=(i,), daemon=True)
               for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT * CALLS)
    assert not [t for t in threads if t.is_alive()], 'a caller thread hung'
    assert errors == []
    return results


def merge(replies):
    merged = {}
    for reply in replies:
        for host, value in reply.items():
            assert host not in merged, f'duplicate reply from {host}'
            merged[host] = value
    return merged


def test_eight_threads_one_mailbox_each_gets_its_own_replies(cluster):
    mailbox, nodes = cluster

    def caller(index):
        wrong = []
        with connect() as conn:
            bound = mailbox(conn)
            for n in range(CALLS):
                value = f'thread{index}-call{n}'
                kind = n % 3
                if kind == 0:
                    target = NODES[(index + n) % len(NODES)]
                    replies = bound.call([target], 'echo', {'value': value},
                                         timeout=TIMEOUT)
                    want = {target: value}
                elif kind == 1:
                    targets = [NODES[index % 3], NODES[(index + 1) % 3]]
                    replies = bound.call(targets, 'echo', {'value': value},
                                         timeout=TIMEOUT)
                    want = {t: value for t in targets}
                else:
                    replies = bound.multi_call('echo', {'value': value},
                                               timeout=TIMEOUT,
                                               limit=len(NODES))
                    want = {t: value for t in NODES}
                if len(replies) != len(want) or merge(replies) != want:
                    wrong.append((n, want, replies))
        return wrong

    results = run_threads(caller)
    assert results == [[]] * THREADS, [r[:3] for r in results if r]
    # every command ran exactly once at each node it addressed
    expected = {h: Counter() for h in NODES}
    for index in range(THREADS):
        for n in range(CALLS):
            value = f'thread{index}-call{n}'
            kind = n % 3
            if kind == 0:
                expected[NODES[(index + n) % len(NODES)]][repr(value)] += 1
            elif kind == 1:
                expected[NODES[index % 3]][repr(value)] += 1
                expected[NODES[(index + 1) % 3]][repr(value)] += 1
            else:
                for h in NODES:
                    expected[h][repr(value)] += 1
    for node in nodes:
        assert node.seen == expected[node.hostname], node.hostname
    # nobody's reply landed with someone else
    assert len(mailbox.unclaimed) == 0
    assert mailbox.unclaimed.reply_count == 0


def test_eight_threads_binding_a_fresh_copy_per_call(cluster):
    """Celery's way: ``mailbox(conn)`` for every broadcast, many threads."""
    mailbox, nodes = cluster

    def caller(index):
        got = []
        with connect() as conn:
            for n in range(CALLS):
                value = [index, n]
                replies = mailbox(conn).call([NODES[n % 3]], 'echo',
                                             {'value': value},
                                             timeout=TIMEOUT)
                got.append(replies)
        return got

    results = run_threads(caller)
    for index, got in enumerate(results):
        assert got == [[{NODES[n % 3]: [index, n]}] for n in range(CALLS)]
    assert mailbox.unclaimed.reply_count == 0


def test_threads_sharing_one_bound_mailbox_keep_separate_reply_queues(
        cluster):
    """A bound copy bound again in each thread: one reply queue (oid) per
    thread and connection, shared by the copies made in that thread."""
    mailbox, nodes = cluster
    oids = set()
    lock = threading.Lock()

    def caller(index):
        with connect() as conn:
            bound = mailbox(conn)
            with lock:
                oids.add(bound.oid)
            rebound = bound(conn)
            assert rebound.oid == bound.oid
            return [rebound.call(['n1'], 'whoami', timeout=TIMEOUT)
                    for _ in range(10)]

    results = run_threads(caller)
    assert len(oids) == THREADS
    assert results == [[[{'n1': 'n1'}]] * 10] * THREADS
