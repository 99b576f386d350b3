"""Wire interoperability with kombu.pidbox, on memory://, Redis and RabbitMQ.

Each case runs three nodes in threads (each with its own connection) and a
client in the test, in every pairing: pidbox client -> kombu nodes, kombu
client -> pidbox nodes, pidbox <-> pidbox; with JSON and msgpack.
"""

from __future__ import annotations

import pytest

from brokerlib import (
    connect, mailbox_class, merge, serializer_opts, unique, wait_answering,
)

pytestmark = pytest.mark.broker

PAIRINGS = [
    pytest.param(('pidbox', 'kombu'), id='pidbox-to-kombu'),
    pytest.param(('kombu', 'pidbox'), id='kombu-to-pidbox'),
    pytest.param(('pidbox', 'pidbox'), id='pidbox-to-pidbox'),
]
BROKERS = ['memory', 'redis', 'amqp']
SERIALIZERS = ['json', 'msgpack']


class Cluster:
    """Three nodes (alpha, beta, gamma) and a bound client mailbox."""

    def __init__(self, client, hostnames, threads):
        self.client = client
        self.alpha, self.beta, self.gamma = hostnames
        self.hostnames = hostnames
        self.threads = threads

    def counts(self):
        """Each node's ``count`` tallies, collected with one multi_call."""
        replies = self.client.multi_call('count', timeout=30,
                                         limit=len(self.hostnames))
        merged = merge(replies)
        assert set(merged) == set(self.hostnames), replies
        return merged


def start_cluster(broker, serializer, pairing, node_threads,
                  exchange_type='fanout'):
    _, url = broker
    client_impl, node_impl = pairing
    namespace = unique('interop')
    opts = dict(type=exchange_type, **serializer_opts(serializer))
    tag = unique('h')
    hostnames = [f'alpha.{tag}', f'beta.{tag}', f'gamma.{tag}']
    threads = node_threads(url, mailbox_class(node_impl)(namespace, **opts),
                           hostnames)
    conn = connect(url)
    client = mailbox_class(client_impl)(namespace, **opts)(conn)
    wait_answering(client, hostnames)
    return conn, Cluster(client, hostnames, threads)


@pytest.fixture(params=PAIRINGS)
def pairing(request):
    return request.param


@pytest.fixture(params=SERIALIZERS)
def serializer(request):
    return request.param


@pytest.fixture
def cluster(broker, serializer, pairing, node_threads):
    conn, cluster = start_cluster(broker, serializer, pairing, node_threads)
    try:
        yield cluster
    finally:
        conn.release()


@pytest.mark.parametrize('broker', BROKERS, indirect=True)
def test_call_and_multi_call(cluster):
    c = cluster
    value = {'text': 'héllo', 'n': [1, 2.5, None, True]}

    # call: one node, then a destination list
    assert c.client.call([c.beta], 'echo', {'value': value},
                         timeout=30) == [{c.beta: value}]
    replies = c.client.call([c.alpha, c.gamma], 'echo', {'value': 7},
                            timeout=30)
    assert merge(replies) == {c.alpha: 7, c.gamma: 7}

    # multi_call to everyone, with a limit: every node answers once
    replies = c.client.multi_call('ping', timeout=30, limit=3)
    assert merge(replies) == {h: {'ok': 'pong'} for h in c.hostnames}

    # multi_call to everyone without a limit: ends with the timeout, and
    # still holds exactly one reply per node
    replies = c.client.multi_call('echo', {'value': 'all'}, timeout=1.5)
    assert merge(replies) == {h: 'all' for h in c.hostnames}


@pytest.mark.parametrize('broker', BROKERS, indirect=True)
def test_patterns(cluster):
    """glob and pcre patterns reach exactly the matching nodes."""
    c = cluster
    glob_tag, pcre_tag = unique('glob'), unique('pcre')
    replies = c.client._broadcast(
        'count', {'tag': glob_tag}, None, True, 30, 1,
        pattern='alpha.*', matcher='glob')
    assert merge(replies) == {c.alpha: 1}
    replies = c.client._broadcast(
        'count', {'tag': pcre_tag}, None, True, 30, 2,
        pattern=r'(beta|gamma)\.', matcher='pcre')
    assert merge(replies) == {c.beta: 1, c.gamma: 1}

    # a node that wrongly ran a request would have counted it before it
    # answered this later call (one queue per node, in order).
    counts = c.counts()
    assert counts == {c.alpha: {glob_tag: 1}, c.beta: {pcre_tag: 1},
                      c.gamma: {pcre_tag: 1}}


@pytest.mark.parametrize('broker', BROKERS, indirect=True)
def test_cast_and_abcast(cluster):
    c = cluster
    for _ in range(3):
        c.client.cast([c.beta], 'count', {'tag': 'cast'})
    c.client.cast([c.alpha, c.gamma], 'count', {'tag': 'pair'})
    c.client.abcast('count', {'tag': 'all'})
    counts = c.counts()
    assert counts == {
        c.alpha: {'pair': 1, 'all': 1},
        c.beta: {'cast': 3, 'all': 1},
        c.gamma: {'pair': 1, 'all': 1},
    }


@pytest.mark.parametrize('broker', BROKERS, indirect=True)
def test_handler_errors_and_unknown_commands(cluster):
    c = cluster
    assert c.client.call([c.alpha], 'boom', {'message': 'kaput'},
                         timeout=30) == [
        {c.alpha: {'error': "RuntimeError('kaput')"}}]
    replies = c.client.multi_call('no_such_command', timeout=30, limit=3)
    assert merge(replies) == {
        h: {'error': "KeyError('no_such_command')"} for h in c.hostnames}
    # the nodes still serve after the errors
    replies = c.client.multi_call('ping', timeout=30, limit=3)
    assert merge(replies) == {h: {'ok': 'pong'} for h in c.hostnames}


@pytest.mark.parametrize('broker', BROKERS, indirect=True)
@pytest.mark.parametrize('pairing', PAIRINGS[:2])
def test_direct_exchange(broker, pairing, node_threads):
    """kombu's default exchange type, ``direct``, interoperates too."""
    conn, c = start_cluster(broker, 'json', pairing, node_threads,
                            exchange_type='direct')
    try:
        replies = c.client.call([c.gamma], 'echo', {'value': 1}, timeout=30)
        assert replies == [{c.gamma: 1}]
        c.client.cast([c.alpha], 'count', {'tag': 'direct'})
        assert c.counts() == {c.alpha: {'direct': 1}, c.beta: {},
                              c.gamma: {}}
    finally:
        conn.release()
