"""Node lifecycle on real brokers: connection loss, duplicate node names."""

from __future__ import annotations

import socket
import subprocess
import threading
import warnings
from time import monotonic

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


def drain_until(conn, done, seconds=DEADLINE):
    """Drain ``conn`` until ``done()`` or ``seconds`` pass."""
    end = monotonic() + seconds
    while not done() and monotonic() < end:
        try:
            conn.drain_events(timeout=0.1)
        except socket.timeout:
            pass


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


def test_reply_on_a_torn_down_amqp_channel_is_a_connection_error(
        amqp_url, core):
    """A delivery py-amqp hands over after the broker closed the connection.

    When RabbitMQ shuts a connection down, py-amqp can still dispatch a
    delivery it had read while kombu tears the channels down; the reply then
    has no channel.  The node must raise a connection error (which a
    consumer loop such as kombu's ConsumerMixin reconnects on), not the
    AttributeError py-amqp would raise, which ended NodeService processes.
    """
    namespace = unique('gone')
    hostname = f'gone.{namespace}'
    mailbox = pidbox.Mailbox(namespace, type='fanout')
    with connect(amqp_url) as node_conn, connect(amqp_url) as client_conn:
        node = mailbox(node_conn).Node(
            hostname, handlers={'ping': lambda state: 'pong'})
        node.channel = node_conn.channel()
        consumer = node.listen()
        assert consumer.on_message is not None   # the core's raw handler
        handler, delivered = consumer.on_message, []
        consumer.on_message = delivered.append

        mailbox(client_conn)._publish('ping', {}, destination=[hostname],
                                      reply_ticket='t-gone')
        drain_until(node_conn, lambda: delivered)
        assert delivered, 'the request never reached the node'

        node_conn.collect()   # what kombu does when the connection dies
        assert node.channel.connection is None
        with pytest.raises(ConnectionError,
                           match='reply for ticket t-gone.*channel is '
                                 'closed'):
            handler(delivered[0])


def test_service_reconnects_when_its_connection_dies_mid_request(
        amqp_url, core):
    """NodeService outlives the race above: it reconnects and answers."""
    from kombu import Connection

    from pidbox.service import NodeService

    namespace = unique('vanish')
    hostname = f'vanish.{namespace}'
    mailbox = pidbox.Mailbox(namespace, type='fanout')
    ready = []

    def vanish(state):
        # the broker drops the connection while the handler runs
        service.node.channel.connection.client.collect()
        return 'gone'

    service = NodeService(
        Connection(amqp_url), mailbox, hostname,
        handlers={'ping': lambda state: 'pong', 'vanish': vanish},
        on_ready=ready.append)
    errors = []

    def run():
        try:
            service.run()
        except BaseException as exc:  # noqa: BLE001 - the test reports it
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        poll(lambda: ready or errors, DEADLINE, message='the node ready')
        with connect(amqp_url) as conn:
            client = mailbox(conn)
            assert client.call([hostname], 'ping', timeout=30) == [
                {hostname: 'pong'}]
            assert client.call([hostname], 'vanish', timeout=1) == []
            poll(lambda: len(ready) >= 2 or errors, DEADLINE,
                 message='the node consuming again')
            assert not errors, errors
            assert client.call([hostname], 'ping', timeout=30) == [
                {hostname: 'pong'}]
        assert thread.is_alive()
    finally:
        service.stop()
        thread.join(30)
    assert not errors, errors


def test_redis_node_drops_requests_for_others_before_a_message(
        redis_url, core):
    """The payload filter sits in front of kombu's Redis delivery callback."""
    namespace = unique('filter')
    mailbox = pidbox.Mailbox(namespace, type='fanout')
    seen, built = [], []
    with connect(redis_url) as node_conn, connect(redis_url) as client_conn:
        node = mailbox(node_conn).Node(
            f'a.{namespace}', handlers={'ping': lambda state: seen.append(1)})
        node.channel = node_conn.channel()
        message_cls = node.channel.Message

        class Counting(message_cls):
            def __init__(self, payload, **kwargs):
                built.append(payload['headers'].get('pidbox-route'))
                super().__init__(payload, **kwargs)
        node.channel.Message = Counting
        node.listen()
        assert any(isinstance(cb, core.PayloadFilter)
                   for cb in node_conn.transport._callbacks.values())

        # Redis fanout is PUB/SUB: the node subscribes on its first poll
        drain_until(node_conn, lambda: False, seconds=0.3)
        client = mailbox(client_conn)
        for _ in range(3):
            client.cast([f'b.{namespace}'], 'ping')
        client.cast([f'a.{namespace}'], 'ping')
        drain_until(node_conn, lambda: seen)
    assert seen == [1]
    assert built == [[[f'a.{namespace}'], '', '']]
