"""``call`` and ``multi_call`` round trips on RabbitMQ and Redis.

Nodes run in forked processes (one node each); the client in this process.
pidbox nodes are called by a pidbox Mailbox, kombu nodes by kombu's.
Deselect with ``-m "not broker"``; each case is bounded (few rounds, 5 s
timeouts, nodes killed at teardown).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import uuid

import pytest

from pidbox import bench

pytestmark = [pytest.mark.broker,
              pytest.mark.benchmark(max_time=1.0, min_rounds=3)]

BROKERS = {
    'rabbitmq': 'amqp://guest:guest@127.0.0.1:5672//',
    'redis': 'redis://127.0.0.1:6379/0',
}


def _broker_up(url):
    from kombu import Connection
    try:
        with Connection(url, connect_timeout=2) as conn:
            conn.connect()
        return True
    except Exception:
        return False


def _serve(impl, url, namespace, hostname, ready):
    from kombu import Connection
    with Connection(url) as conn:
        node = bench.make_node(impl, hostname, conn, namespace,
                               channel=conn.channel())
        node.listen()
        ready.set()
        while True:
            try:
                conn.drain_events(timeout=1)
            except OSError:     # socket.timeout
                pass


@pytest.fixture(params=list(BROKERS))
def broker(request):
    url = BROKERS[request.param]
    if not _broker_up(url):
        pytest.skip(f'{request.param} not reachable at {url}')
    return request.param, url


def _start_nodes(impl, url, count):
    ctx = multiprocessing.get_context('fork')
    namespace = f'bench-{impl}-{uuid.uuid4().hex[:8]}'
    procs = []
    readies = []
    for i in range(count):
        ready = ctx.Event()
        proc = ctx.Process(
            target=_serve, daemon=True,
            args=(impl, url, namespace,
                  f'worker-{i}@bench-host-{i:02d}.example.com', ready))
        proc.start()
        procs.append(proc)
        readies.append(ready)
    for ready in readies:
        if not ready.wait(30):
            _stop(procs)
            pytest.fail(f'{impl} nodes did not start within 30 s')
    return namespace, procs


def _stop(procs):
    for proc in procs:
        if proc.is_alive():
            os.kill(proc.pid, signal.SIGTERM)
    for proc in procs:
        proc.join(5)


@pytest.mark.parametrize('nodes', [1, 10, 50])
def test_multi_call(benchmark, impl, broker, nodes):
    from kombu import Connection
    name, url = broker
    namespace, procs = _start_nodes(impl, url, nodes)
    try:
        with Connection(url) as conn:
            mailbox = bench.make_node(impl, 'client', None,
                                      namespace).mailbox(conn)

            def multi_call():
                replies = mailbox.multi_call('ping', timeout=5, limit=nodes)
                assert len(replies) == nodes, replies
                return replies
            multi_call()
            benchmark.group = f'{name} multi_call ping x{nodes} nodes'
            benchmark.pedantic(multi_call, rounds=40 if nodes < 50 else 15)
    finally:
        _stop(procs)


def test_call_one_node(benchmark, impl, broker):
    from kombu import Connection
    name, url = broker
    namespace, procs = _start_nodes(impl, url, 1)
    target = 'worker-0@bench-host-00.example.com'
    try:
        with Connection(url) as conn:
            mailbox = bench.make_node(impl, 'client', None,
                                      namespace).mailbox(conn)

            def call():
                replies = mailbox.call([target], 'ping', timeout=5)
                assert replies == [{target: {'ok': 'pong'}}], replies
            call()
            benchmark.group = f'{name} call ping 1 node'
            benchmark.pedantic(call, rounds=100)
    finally:
        _stop(procs)


@pytest.mark.parametrize('nodes', [10])
def test_multi_call_ends(impl, broker, nodes, capsys):
    """When a multi_call returns: at its deadline without ``limit``, and
    right after the last reply with ``limit``.  Prints the overshoot past
    the deadline and the wait after the last reply (no pass/fail on time)."""
    from time import monotonic

    from kombu import Connection
    name, url = broker
    namespace, procs = _start_nodes(impl, url, nodes)
    timeout = 0.5
    try:
        with Connection(url) as conn:
            mailbox = bench.make_node(impl, 'client', None,
                                      namespace).mailbox(conn)
            mailbox.multi_call('ping', timeout=5, limit=nodes)  # warm up
            overshoots, waits = [], []
            for _ in range(5):
                arrivals = []
                started = monotonic()
                replies = mailbox.multi_call(
                    'ping', timeout=timeout,
                    callback=lambda body: arrivals.append(monotonic()))
                overshoots.append(monotonic() - started - timeout)
                assert len(replies) == nodes
                started = monotonic()
                replies = mailbox.multi_call(
                    'ping', timeout=5, limit=nodes,
                    callback=lambda body: arrivals.append(monotonic()))
                waits.append(monotonic() - arrivals[-1])
                assert len(replies) == nodes
    finally:
        _stop(procs)
    overshoots.sort()
    waits.sort()
    with capsys.disabled():
        print(f'\n{name} {impl}: multi_call x{nodes}, timeout {timeout}s '
              f'without limit returns {overshoots[2] * 1e3:+.1f} ms past '
              f'the deadline (median of 5); with limit={nodes}, '
              f'{waits[2] * 1e3:.2f} ms after the last reply')
