"""Node lifecycle on real brokers: connection loss, duplicate node names."""

from __future__ import annotations

import subprocess
import warnings

import pytest
from kombu.exceptions import InconsistencyError

import pidbox
from brokerlib import (
    connect, poll, require_tool, serializer_opts, service_args, tail, unique,
)

pytestmark = pytest.mark.broker

DEADLINE = 90.0


def ready_count(proc):
    return tail(proc.log_path, 10 ** 6).count('READY ')


def answers(url, namespace, hostname):
    """One ping over a fresh connection: True when ``hostname`` answered."""
    try:
        with connect(url) as conn:
            client = pidbox.Mailbox(namespace, type='fanout',
                                    **serializer_opts('msgpack'))(conn)
            return client.call([hostname], 'ping', timeout=2.0) == [
                {hostname: {'ok': 'pong'}}]
    except Exception:  # noqa: BLE001 - the broker may still be recovering
        return False


def kill_redis_connections(url, name):
    """Close the Redis connections named ``name`` (and no one else's)."""
    import redis
    admin = redis.Redis.from_url(url)
    try:
        ids = [c['id'] for c in admin.client_list() if c.get('name') == name]
        for client_id in ids:
            admin.client_kill_filter(_id=client_id)
        return len(ids)
    finally:
        admin.close()


def kill_amqp_connections(url, name):
    """Close the RabbitMQ connections named ``name`` (and no one else's)."""
    rabbitmqctl = require_tool('rabbitmqctl')
    listed = subprocess.run(
        [rabbitmqctl, '-q', 'list_connections', '--no-table-headers',
         'pid', 'client_properties'],
        capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr
    pids = [line.split('\t', 1)[0] for line in listed.stdout.splitlines()
            if f'{{"connection_name","{name}"}}' in line]
    for pid in pids:
        done = subprocess.run(
            [rabbitmqctl, 'close_connection', pid, 'pidbox broker test'],
            capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
    return len(pids)


KILLERS = {'redis': kill_redis_connections, 'amqp': kill_amqp_connections}


@pytest.mark.parametrize('broker', ['redis', 'amqp'], indirect=True)
@pytest.mark.parametrize('impl', ['pidbox', 'kombu'])
def test_service_keeps_serving_after_connection_loss(broker, impl, processes,
                                                     tmp_path):
    name, url = broker
    namespace = unique('life')
    hostname = f'survivor.{namespace}'
    connection_name = f'pidbox-test-{namespace}'
    proc = processes(service_args(url, hostname, namespace, impl=impl,
                                  serializer='msgpack') +
                     ['--connection-name', connection_name],
                     log_path=tmp_path / 'service.log')
    poll(lambda: ready_count(proc) >= 1 or proc.poll() is not None,
         DEADLINE, message='READY line')
    assert proc.poll() is None, tail(proc.log_path)
    poll(lambda: answers(url, namespace, hostname), DEADLINE,
         message='first answer')

    assert KILLERS[name](url, connection_name) >= 1, 'no connection closed'

    # the service notices, reconnects (a second READY) and answers again
    poll(lambda: ready_count(proc) >= 2 or proc.poll() is not None,
         DEADLINE, message='reconnect')
    assert proc.poll() is None, tail(proc.log_path)
    poll(lambda: answers(url, namespace, hostname), DEADLINE,
         message='answer after reconnect')
    with connect(url) as conn:
        client = pidbox.Mailbox(namespace, type='fanout',
                                **serializer_opts('msgpack'))(conn)
        client.cast([hostname], 'count', {'tag': 'after'})
        assert client.call([hostname], 'count', timeout=30) == [
            {hostname: {'after': 1}}]


def _listen(mailbox, hostname, conn):
    node = mailbox(conn).Node(hostname)
    node.channel = conn.channel()
    return node.listen()


def test_same_hostname_twice_on_rabbitmq(amqp_url):
    namespace = unique('dup')
    hostname = f'twin.{namespace}'
    mailbox = pidbox.Mailbox(namespace, type='fanout')
    with connect(amqp_url) as first, connect(amqp_url) as second:
        consumer = _listen(mailbox, hostname, first)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter('ignore')
                with pytest.raises(InconsistencyError,
                                   match='already using this process '
                                         'mailbox'):
                    _listen(mailbox, hostname, second)
        finally:
            consumer.cancel()


def test_same_hostname_twice_unbound_mailbox_on_rabbitmq(amqp_url):
    """As Celery builds it: ``Node`` from an unbound mailbox, channel later."""
    namespace = unique('dup')
    hostname = f'twin.{namespace}'
    mailbox = pidbox.Mailbox(namespace, type='fanout')
    with connect(amqp_url) as first, connect(amqp_url) as second:
        consumer = _listen(mailbox, hostname, first)
        try:
            node = mailbox.Node(hostname, handlers={})
            assert node.mailbox.connection is None
            node.channel = second.channel()
            with warnings.catch_warnings():
                warnings.simplefilter('ignore')
                with pytest.raises(InconsistencyError,
                                   match='already using this process '
                                         'mailbox'):
                    node.listen(callback=lambda body, message: None)
        finally:
            consumer.cancel()
