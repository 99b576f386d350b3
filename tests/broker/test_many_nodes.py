"""Many node processes on one fanout mailbox, on Redis and RabbitMQ.

``PIDBOX_TEST_NODES`` (default 20) ``python -m pidbox.service`` processes,
every fifth one running kombu.pidbox's node, so the cluster is mixed.
"""

from __future__ import annotations

import os
import random
import threading
from collections import Counter
from time import monotonic

import pytest

import pidbox
from brokerlib import (
    connect, merge, require, start_services, tail, terminate, unique,
    wait_for_fleet,
)

pytestmark = pytest.mark.broker

NODES = int(os.environ.get('PIDBOX_TEST_NODES', '20'))
CASTS = 1000
READY_DEADLINE = 120.0
TIMEOUT = 60.0


class Fleet:
    def __init__(self, url, namespace, hostnames, procs):
        self.url = url
        self.namespace = namespace
        self.hostnames = hostnames
        self.procs = procs

    def mailbox(self):
        return pidbox.Mailbox(self.namespace, type='fanout')

    def logs(self):
        return '\n'.join(f'--- {p.args[6]} ---\n{tail(p.log_path, 1500)}'
                         for p in self.procs if p.poll() is not None)


@pytest.fixture(scope='module', params=['redis', 'amqp'])
def fleet(request, tmp_path_factory):
    url = require(request.param)
    namespace = unique('fleet')
    logs = tmp_path_factory.mktemp(f'fleet-{request.param}')
    hostnames = [f'node{i:03d}.{namespace}' for i in range(NODES)]
    procs = []
    try:
        start_services(procs, url, namespace, hostnames, logs,
                       impl_of=lambda i: 'kombu' if i % 5 == 4 else 'pidbox')
        fleet = Fleet(url, namespace, hostnames, procs)
        wait_for_fleet(fleet, READY_DEADLINE)
        yield fleet
    finally:
        terminate(*procs)


def test_multi_call_gets_every_reply(fleet):
    with connect(fleet.url) as conn:
        client = fleet.mailbox()(conn)
        replies = client.multi_call('ping', timeout=TIMEOUT, limit=NODES)
        assert merge(replies) == {h: {'ok': 'pong'} for h in fleet.hostnames}
        assert len(replies) == NODES


def test_call_reaches_exactly_the_named_nodes(fleet):
    rng = random.Random(1)
    tag = unique('named')
    with connect(fleet.url) as conn:
        client = fleet.mailbox()(conn)
        expected = Counter()
        for size in (1, 2, 5, NODES // 2):
            chosen = rng.sample(fleet.hostnames, size)
            replies = client.call(chosen, 'count', {'tag': tag},
                                  timeout=TIMEOUT)
            assert set(merge(replies)) == set(chosen)
            expected.update(chosen)
        counts = merge(client.multi_call('count', timeout=TIMEOUT,
                                         limit=NODES))
    assert set(counts) == set(fleet.hostnames)
    got = {h: c[tag] for h, c in counts.items() if tag in c}
    assert got == dict(expected)


def test_casts_reach_every_addressed_node_exactly_once(fleet):
    """1,000 casts to varying destinations, then one call collects counts."""
    rng = random.Random(2)
    tag = unique('cast')
    expected = Counter()
    started = monotonic()
    with connect(fleet.url) as conn:
        client = fleet.mailbox()(conn)
        for i in range(CASTS):
            if i % 100 == 99:
                client.abcast('count', {'tag': tag})
                expected.update(fleet.hostnames)
                continue
            chosen = rng.sample(fleet.hostnames, rng.randint(1, 4))
            client.cast(chosen, 'count', {'tag': tag})
            expected.update(chosen)
        published = monotonic() - started
        counts = merge(client.multi_call('count', timeout=TIMEOUT,
                                         limit=NODES))
    print(f'{CASTS} casts to {NODES} nodes: published in {published:.2f}s, '
          f'all counted after {monotonic() - started:.2f}s')
    assert set(counts) == set(fleet.hostnames)
    got = {h: c.get(tag, 0) for h, c in counts.items()}
    assert got == {h: expected[h] for h in fleet.hostnames}


def test_concurrent_callers_get_only_their_own_replies(fleet):
    """Several callers at once: no reply lost or given to the wrong one."""
    callers, calls = 4, 25
    failures = []

    def caller(index):
        rng = random.Random(100 + index)
        try:
            with connect(fleet.url) as conn:
                client = fleet.mailbox()(conn)
                for n in range(calls):
                    value = f'caller{index}-call{n}'
                    if n % 5 == 4:
                        replies = client.multi_call(
                            'echo', {'value': value}, timeout=TIMEOUT,
                            limit=NODES)
                        want = {h: value for h in fleet.hostnames}
                    else:
                        chosen = rng.sample(fleet.hostnames,
                                            rng.randint(1, 3))
                        replies = client.call(chosen, 'echo',
                                              {'value': value},
                                              timeout=TIMEOUT)
                        want = {h: value for h in chosen}
                    got = merge(replies)
                    if got != want:
                        failures.append((index, n, want, got))
        except Exception as exc:  # noqa: BLE001 - reported below
            failures.append((index, repr(exc)))

    threads = [threading.Thread(target=caller, args=(i,))
               for i in range(callers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT * calls)
    assert not any(t.is_alive() for t in threads), 'a caller hung'
    assert not failures, failures[:3]
