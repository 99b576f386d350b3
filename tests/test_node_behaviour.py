"""pidbox's own node and client behaviour, beyond what kombu promises."""

from __future__ import annotations

import logging
import threading
import time
from unittest import mock

import pytest
from kombu import Connection, Producer
from kombu.exceptions import EncodeError

import pidbox
from memory_nodes import publish_raw, serve
from pidbox.exceptions import ROUTE_HEADER
from pidbox.replies import Unclaimed

pytestmark = pytest.mark.usefixtures('core')


@pytest.fixture
def bound(memory_connection):
    return pidbox.Mailbox('behaviour', type='fanout')(memory_connection)


def make_node(bound, hostname, **handlers):
    conn = bound.connection
    node = bound.Node(hostname, state={'name': hostname},
                      channel=conn.channel(), handlers=dict(handlers))
    node.listen()
    return node


def test_dispatch_core_is_the_one_under_test(core, bound):
    node = bound.Node('a')
    assert type(node.get_dispatcher()) is core.Dispatcher


def test_route_header_decides_over_the_body(bound):
    seen = []
    make_node(bound, 'a', ping=lambda state: seen.append('a'))
    make_node(bound, 'b', ping=lambda state: seen.append('b'))
    body = b'{"method": "ping", "arguments": {}, "destination": ["a"]}'
    publish_raw(bound, body, headers={ROUTE_HEADER: [['b'], '', '']})
    serve(bound.connection, 0.3)
    assert seen == ['b']


def test_expired_call_is_dropped_with_a_debug_line(bound, caplog):
    seen = []
    make_node(bound, 'a', ping=lambda state: seen.append(1))
    call = (b'{"method": "ping", "arguments": {}, "ticket": "t", '
            b'"reply_to": {"exchange": "reply.behaviour.pidbox", '
            b'"routing_key": "nobody"}}')
    with caplog.at_level(logging.DEBUG, logger='pidbox'):
        publish_raw(bound, call, headers={'expires': time.time() - 5})
        publish_raw(bound, call, headers={'expires': time.time() + 60})
        serve(bound.connection, 0.3)
    assert seen == [1]
    assert any('expired' in r.getMessage() for r in caplog.records)


def test_late_cast_still_runs_and_a_stale_one_does_not(bound):
    seen = []
    node = make_node(bound, 'a', ping=lambda state: seen.append(1))
    cast = b'{"method": "ping", "arguments": {}}'
    now = time.time()
    publish_raw(bound, cast, headers={'expires': now - 5})
    publish_raw(bound, cast,
                headers={'expires': now - node.cast_expiry_grace - 5})
    serve(bound.connection, 0.3)
    assert seen == [1]


def test_bad_expires_and_clock_headers_do_not_stop_the_node(bound, caplog):
    seen = []
    make_node(bound, 'a', ping=lambda state: seen.append(1))
    body = b'{"method": "ping", "arguments": {}}'
    with caplog.at_level(logging.ERROR, logger='pidbox'):
        publish_raw(bound, body, headers={'expires': 'soon', 'clock': 'x'})
        publish_raw(bound, body, headers={'clock': 'not-a-clock'})
        serve(bound.connection, 0.3)
    assert seen == [1]
    assert [r for r in caplog.records if "'expires'" in r.getMessage()
            or 'expires:' in r.getMessage()]


def test_malformed_requests_are_logged_and_the_node_keeps_serving(
        bound, caplog):
    make_node(bound, 'a', ping=lambda state: 'pong')
    bad = [
        (b'[1, 2]', 'body'),
        (b'{"arguments": {}}', 'method'),
        (b'{"method": 7}', 'method'),
        (b'{"method": "ping", "arguments": [1]}', 'arguments'),
        (b'{"method": "ping", "reply_to": "nowhere"}', 'reply_to'),
        (b'{"method": "ping", "destination": 5}', 'destination'),
        (b'{"method": "ping", "pattern": "a", "matcher": "nope"}', 'matcher'),
        (b'\xff\xfe', 'body'),
    ]
    with caplog.at_level(logging.ERROR):
        for body, _ in bad:
            publish_raw(bound, body)
        replies = bound.call(['a'], 'ping', timeout=2)
    assert replies == [{'a': 'pong'}]
    messages = [r.getMessage() for r in caplog.records]
    for body, field in bad:
        assert any(f'{field}:' in m for m in messages), (body, messages)


def test_handle_message_rejects_malformed_bodies_without_raising(bound,
                                                                 caplog):
    node = bound.Node('a', handlers={'ping': lambda state: 'pong'})
    with caplog.at_level(logging.ERROR, logger='pidbox'):
        assert node.handle_message(['not', 'a', 'dict']) is None
        assert node.handle_message({'arguments': {}}) is None
        assert node.handle_message({'method': 'ping'}) == 'pong'
    assert len(caplog.records) == 2


def test_unserializable_result_becomes_an_error_reply(bound, caplog):
    make_node(bound, 'a', odd=lambda state: object())
    with caplog.at_level(logging.ERROR, logger='pidbox'):
        replies = bound.call(['a'], 'odd', timeout=2)
    assert len(replies) == 1
    assert 'EncodeError' in replies[0]['a']['error']
    assert any('cannot serialize' in r.getMessage() for r in caplog.records)


def test_overridden_dispatch_is_used_on_the_raw_path(bound):
    calls = []

    class AuditedNode(pidbox.Node):
        def handle(self, method, arguments=None):
            calls.append((method, arguments))
            return super().handle(method, arguments)

    bound.node_cls = AuditedNode
    node = bound.Node('a', channel=bound.connection.channel(),
                      handlers={'add': lambda state, x, y: x + y})
    node.listen()
    assert bound.call(['a'], 'add', {'x': 1, 'y': 2}, timeout=2) == [{'a': 3}]
    assert calls == [('add', {'x': 1, 'y': 2})]


def test_unknown_command_gets_kombus_error_reply_and_one_log_line(
        bound, caplog):
    make_node(bound, 'a')
    with caplog.at_level(logging.ERROR, logger='pidbox'):
        replies = bound.call(['a'], 'missing', timeout=2)
    assert replies == [{'a': {'error': "KeyError('missing')"}}]
    assert [r.getMessage() for r in caplog.records] == [
        "pidbox: no such command: 'missing'"]


def test_bound_copies_share_a_reply_queue_per_connection():
    mailbox = pidbox.Mailbox('oid')
    c1, c2 = Connection('memory://'), Connection('memory://')
    assert mailbox(c1).oid == mailbox(c1).oid
    assert mailbox(c1).oid != mailbox(c2).oid
    assert mailbox(c1).oid != pidbox.Mailbox('oid')(c1).oid
    other_thread = []
    t = threading.Thread(target=lambda: other_thread.append(mailbox(c1).oid))
    t.start()
    t.join()
    assert other_thread[0] != mailbox(c1).oid


def test_copy_does_not_inherit_a_reply_queue_named_for_another_connection():
    mailbox = pidbox.Mailbox('oid')
    assert mailbox.reply_queue.routing_key == mailbox.oid
    bound = mailbox(Connection('memory://'))
    assert bound.reply_queue.routing_key == bound.oid != mailbox.oid


def test_call_deadline_is_total_despite_foreign_replies(bound):
    # a node that answers slowly, and a stream of replies for other tickets
    make_node(bound, 'a')
    stop = threading.Event()
    started = time.monotonic()
    producer_conn = Connection('memory://')
    oid = bound.oid   # the caller's, computed in the caller's thread
    flooded = []

    def flood():
        flooder = pidbox.Mailbox('behaviour', type='fanout')(producer_conn)
        while not stop.is_set():
            flooder._publish_reply({'x': 1}, bound.reply_exchange.name,
                                   oid, f'someone-else-{len(flooded)}')
            flooded.append(1)
            time.sleep(0.002)

    thread = threading.Thread(target=flood)
    thread.start()
    try:
        assert bound.multi_call('ping', timeout=0.5) == [
            {'a': {'error': "KeyError('ping')"}}]
    finally:
        stop.set()
        thread.join()
    elapsed = time.monotonic() - started
    assert elapsed < 3.0  # kombu's idle-gap timeout would never end here
    assert len(flooded) > 20
    assert 0 < bound.unclaimed.reply_count <= bound.unclaimed.max_replies


def test_unclaimed_is_bounded_by_count_and_age(monkeypatch):
    unclaimed = Unclaimed(max_replies=3, max_age=10)
    for i in range(5):
        unclaimed.add(f't{i}', i)
    assert list(unclaimed) == ['t2', 't3', 't4']
    assert unclaimed.reply_count == 3
    now = time.monotonic()
    monkeypatch.setattr('pidbox.replies.monotonic', lambda: now + 60)
    unclaimed.add('fresh', 'x')
    assert list(unclaimed) == ['fresh']
    assert list(unclaimed.pop('fresh')) == ['x']
    with pytest.raises(KeyError):
        unclaimed.pop('t4')


def test_collect_returns_unclaimed_then_waits_for_the_rest(bound):
    make_node(bound, 'a', ping=lambda state: 'pong')
    bound.unclaimed.add('ticket-1', {'z': 'early'})
    got = []
    replies = bound._collect('ticket-1', limit=1, timeout=1, callback=got.append)
    assert replies == [{'z': 'early'}] == got


def test_encode_error_from_a_patched_reply_path_is_contained(bound):
    node = bound.Node('a', handlers={'ping': lambda state: 'pong'})
    sent = []

    def reply(data, exchange, routing_key, ticket, **kwargs):
        if not sent:
            sent.append('failed')
            raise EncodeError('cannot encode')
        sent.append(data)

    node.reply = reply
    node.dispatch('ping', reply_to={'exchange': 'x', 'routing_key': 'y'},
                  ticket='t')
    assert sent == ['failed', {'a': {'error': "EncodeError('cannot encode')"}}]


def test_dispatch_patched_on_the_class_after_listen_is_used(bound):
    make_node(bound, 'a', add=lambda state, x, y: x + y)
    seen = []
    original = pidbox.Node.handle

    def spy(self, method, arguments=None):
        seen.append(method)
        return original(self, method, arguments)

    with mock.patch.object(pidbox.Node, 'handle', spy):
        assert bound.call(['a'], 'add', {'x': 2, 'y': 3}, timeout=2) == [
            {'a': 5}]
    assert seen == ['add']
    assert bound.call(['a'], 'add', {'x': 1, 'y': 1}, timeout=2) == [
        {'a': 2}]
    assert seen == ['add']


def test_run_replaced_on_the_instance_after_listen_is_used(bound):
    node = make_node(bound, 'a', add=lambda state, x, y: x + y)
    seen = []
    original = node._run

    def spy(request):
        seen.append(request['method'])
        return original(request)

    node._run = spy
    assert bound.call(['a'], 'add', {'x': 2, 'y': 3}, timeout=2) == [
        {'a': 5}]
    assert seen == ['add']
    del node._run
    assert bound.call(['a'], 'add', {'x': 1, 'y': 1}, timeout=2) == [
        {'a': 2}]
    assert seen == ['add']


def test_run_overridden_in_a_subclass_is_used(bound, monkeypatch):
    seen = []

    class Audited(pidbox.Node):
        def _run(self, request):
            seen.append(request['method'])
            return super()._run(request)

    monkeypatch.setattr(bound, 'node_cls', Audited)
    node = make_node(bound, 'a', add=lambda state, x, y: x + y)
    assert type(node) is Audited
    assert bound.call(['a'], 'add', {'x': 2, 'y': 3}, timeout=2) == [
        {'a': 5}]
    assert seen == ['add']


# -- the payload filter on virtual transports --------------------------------

def counting_messages(node):
    """Count the Messages the node's virtual channel builds."""
    channel = node.channel
    built = []
    message_cls = channel.Message

    class Counting(message_cls):
        def __init__(self, payload, **kwargs):
            built.append(payload.get('headers'))
            super().__init__(payload, **kwargs)

    channel.Message = Counting
    return built


def test_requests_for_other_nodes_are_dropped_before_a_message_is_built(
        core, bound):
    seen = []
    node = make_node(bound, 'a', ping=lambda state: seen.append('a'))
    callbacks = node.channel.connection._callbacks
    assert any(isinstance(cb, core.PayloadFilter) for cb in callbacks.values())
    built = counting_messages(node)
    clock_before = node.mailbox.clock.value

    bound.cast(['b'], 'ping')                      # for another node
    bound._broadcast('ping', {}, pattern='z*', matcher='glob')   # ditto
    bound.cast(['a'], 'ping')                      # for this one
    serve(bound.connection, 0.3)

    assert seen == ['a']
    assert len(built) == 1                         # only the one for 'a'
    # the clock still moved for every message, as kombu's node moves it
    assert node.mailbox.clock.value >= clock_before + 3


def test_what_the_filter_cannot_decide_takes_the_usual_way(bound, caplog):
    """No route header, compression, a refused type: a Message and a log."""
    seen = []
    node = make_node(bound, 'a', ping=lambda state: seen.append('a'))
    built = counting_messages(node)
    other = b'{"method": "ping", "arguments": {}, "destination": ["b"]}'
    with caplog.at_level(logging.WARNING, logger='pidbox'):
        publish_raw(bound, other)                  # a stock client's
        publish_raw(bound, other, content_type='application/x-yaml',
                    headers={ROUTE_HEADER: [['b'], '', '']})
        publish_raw(bound, other, headers={ROUTE_HEADER: 'not a route'})
        serve(bound.connection, 0.3)
    assert seen == []
    assert len(built) == 3
    logged = ' '.join(r.getMessage() for r in caplog.records)
    assert 'x-yaml' in logged
    assert ROUTE_HEADER in logged


def test_compressed_requests_are_not_filtered(bound):
    seen = []
    node = make_node(bound, 'a', ping=lambda state: seen.append('a'))
    built = counting_messages(node)
    producer = Producer(bound.connection.default_channel)
    for destination in (['b'], ['a']):
        producer.publish(
            {'method': 'ping', 'arguments': {}, 'destination': destination},
            exchange=bound.exchange.name, routing_key='', serializer='json',
            compression='zlib',
            headers={ROUTE_HEADER: [destination, '', '']})
    serve(bound.connection, 0.3)
    assert seen == ['a']
    assert len(built) == 2


def test_changed_consumer_callbacks_see_every_message(bound):
    """A callback added after listen() gets what kombu would give it."""
    node = make_node(bound, 'a', ping=lambda state: None)
    got = []
    node_consumer = next(iter(
        node.channel.connection._callbacks.values())).handler.consumer
    node_consumer.callbacks.append(lambda body, message: got.append(body))
    bound.cast(['b'], 'ping')
    serve(bound.connection, 0.3)
    assert [body['destination'] for body in got] == [['b']]


def test_replaced_on_message_sees_every_message(bound):
    node = make_node(bound, 'a', ping=lambda state: None)
    handler = next(iter(node.channel.connection._callbacks.values())).handler
    got = []
    handler.consumer.on_message = got.append
    bound.cast(['b'], 'ping')
    serve(bound.connection, 0.3)
    assert len(got) == 1
