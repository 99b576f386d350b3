"""Celery's use of ``kombu.pidbox``, with ``pidbox`` in its place.

Celery builds one unbound ``Mailbox`` per app (``celery.app.control.Control``),
binds a fresh copy for every broadcast, calls the private ``_broadcast``
positionally, deletes ``producer_pool`` after fork, and runs the worker side
through ``celery.worker.pidbox.Pidbox``: ``mailbox.Node(...)`` from the
unbound mailbox, ``node.channel = ...``, ``node.listen(callback=...)``, its own
``on_decode_error``, and ``node.handle_message(body, message)`` from its
callback.  Every test runs with both dispatch cores (``core`` fixture).
"""

from __future__ import annotations

import logging
import queue
from time import monotonic
from unittest.mock import Mock

import pytest
from celery import Celery
from celery.app.control import Control
from celery.exceptions import ImproperlyConfigured
from celery.utils.collections import AttributeDict
from celery.worker import control as worker_control
from celery.worker.pidbox import Pidbox
from kombu import Producer as KombuProducer
from kombu import pidbox as kombu_pidbox
from kombu.exceptions import ContentDisallowed, DecodeError

import pidbox
from memory_nodes import (
    DEADLINE, NodeServer, by_host, drain_queue, fresh_connection, names_field,
    unique, warning_texts,
)

pytestmark = pytest.mark.usefixtures('core')



# -- helpers ---------------------------------------------------------------

class PidboxControl(Control):
    """Celery's remote control client with pidbox's Mailbox."""

    Mailbox = pidbox.Mailbox


def make_app(namespace, use_pidbox=True, serializer='json', **conf):
    app = Celery(unique('app'), broker='memory://', set_as_current=False,
                 control=PidboxControl if use_pidbox else Control)
    app.conf.update(
        broker_transport_options={'polling_interval': 0.01},
        control_exchange=namespace,
        accept_content=['json', 'msgpack'],
        task_serializer=serializer,
        **conf)
    return app


@pytest.fixture
def app():
    app = make_app(unique())
    try:
        yield app
    finally:
        app.close()


class FakeWorkerConsumer:
    """What celery.worker.pidbox.Pidbox needs from the worker's Consumer."""

    def __init__(self, app, hostname, connection):
        self.app = app
        self.hostname = hostname
        self.connection = connection
        self.controller = Mock(name='controller', use_eventloop=False)
        self.event_dispatcher = Mock(name='event_dispatcher')
        self.event_dispatcher.groups = {'worker'}
        self.decode_errors = queue.Queue()

    def on_decode_error(self, message, exc):
        self.decode_errors.put(exc)


def celery_workers(app, hostnames):
    """Real Celery ``Pidbox`` instances (one per hostname) in a thread."""
    app.control  # noqa: B018 - create the Control (and Mailbox) up front

    def setup(conn):
        boxes = []
        for hostname in hostnames:
            c = FakeWorkerConsumer(app, hostname, conn)
            box = Pidbox(c)
            box.resets = 0
            original_reset = box.reset

            def reset(box=box, original_reset=original_reset):
                box.resets += 1
                original_reset()
            box.reset = reset
            box.start(c)
            boxes.append((box, c))
        return boxes
    return NodeServer(setup)


# -- Control builds pidbox's Mailbox the way it builds kombu's --------------

class TestControlMailbox:

    def test_mailbox_built_by_celery(self, app):
        mailbox = app.control.mailbox
        assert isinstance(mailbox, pidbox.Mailbox)
        assert mailbox.connection is None
        assert mailbox.namespace == app.conf.control_exchange
        assert mailbox.type == 'fanout'
        assert mailbox.exchange.type == 'fanout'
        assert mailbox.exchange.name == f'{app.conf.control_exchange}.pidbox'
        assert mailbox.reply_exchange.type == 'direct'
        assert mailbox.accept == ['json', 'msgpack']
        assert mailbox.serializer == 'json'
        assert mailbox.queue_ttl == app.conf.control_queue_ttl == 300.0
        assert mailbox.reply_queue_ttl == 300.0
        assert mailbox.queue_expires == app.conf.control_queue_expires
        assert mailbox.reply_queue_expires == 10.0
        assert mailbox.queue_exclusive is True
        assert mailbox.queue_durable is False

    def test_durable_control_queues(self):
        app = make_app(unique(), control_queue_durable=True,
                       control_queue_exclusive=False)
        try:
            mailbox = app.control.mailbox
            q = mailbox.get_queue('w1@h')
            assert (q.durable, q.exclusive, q.auto_delete) == \
                (True, False, False)
        finally:
            app.close()

    def test_durable_and_exclusive_rejected(self):
        app = make_app(unique(), control_queue_durable=True,
                       control_queue_exclusive=True)
        try:
            with pytest.raises(ImproperlyConfigured):
                app.control  # noqa: B018
            with pytest.raises(ValueError):
                pidbox.Mailbox('celery', type='fanout', queue_durable=True,
                               queue_exclusive=True)
        finally:
            app.close()

    def test_after_fork_deletes_producer_pool(self, app):
        mailbox = app.control.mailbox
        app.control._after_fork()   # never accessed: must not raise
        pool = mailbox.producer_pool
        assert pool is app.amqp.producer_pool
        app.control._after_fork()
        assert 'producer_pool' not in vars(mailbox)
        assert mailbox.producer_pool is app.amqp.producer_pool

    def test_bound_copy_per_broadcast(self, app):
        mailbox = app.control.mailbox
        with app.connection_for_write() as conn:
            one, two = mailbox(conn), mailbox(conn)
            assert one is not two and one is not mailbox
            assert one.connection is conn
            assert mailbox.connection is None
            assert one.exchange is mailbox.exchange
            assert one.unclaimed is mailbox.unclaimed


# -- _broadcast called positionally, as celery/app/control.py does ---------

class CollectingMailbox(pidbox.Mailbox):
    """A subclass overriding _collect: call()/multi_call() must use it."""

    def _collect(self, ticket, limit=None, timeout=1, callback=None,
                 channel=None, accept=None):
        type(self).collected.append({
            'ticket': ticket, 'limit': limit, 'timeout': timeout,
            'callback': callback, 'channel': channel})
        return ['COLLECTED']


class TestBroadcastSignature:

    @pytest.fixture(autouse=True)
    def _collected(self):
        CollectingMailbox.collected = []
        yield
        CollectingMailbox.collected = []

    def published(self, mailbox, hostname, conn):
        node = mailbox(conn).Node(hostname, channel=conn.channel())
        return node.Consumer()   # declares and binds the node queue

    def test_positional_without_pattern(self, memory_connection):
        mailbox = CollectingMailbox(unique(), type='fanout')
        consumer = self.published(mailbox, 'w1@h', memory_connection)
        callback = Mock(name='callback')
        result = mailbox(memory_connection)._broadcast(
            'ping', {'a': 1}, ['w1@h', 'w2@h'], True, 2.5, None, callback,
            channel=None)
        assert result == ['COLLECTED']
        (collected,) = CollectingMailbox.collected
        assert collected['limit'] == 2     # from len(destination)
        assert collected['timeout'] == 2.5
        assert collected['callback'] is callback
        assert collected['channel'] is not None
        body = consumer.queues[0].get(no_ack=True).payload
        assert body['method'] == 'ping'
        assert body['arguments'] == {'a': 1}
        assert body['destination'] == ['w1@h', 'w2@h']
        assert body['ticket'] == collected['ticket']
        assert body['reply_to']['exchange'] == mailbox.reply_exchange.name

    def test_positional_with_pattern(self, memory_connection):
        mailbox = CollectingMailbox(unique(), type='fanout')
        consumer = self.published(mailbox, 'w1@h', memory_connection)
        channel = memory_connection.channel()
        result = mailbox(memory_connection)._broadcast(
            'ping', {}, None, True, 1.0, 3, None, channel=channel,
            pattern='w*', matcher='glob')
        assert result == ['COLLECTED']
        (collected,) = CollectingMailbox.collected
        assert collected['limit'] == 3
        assert collected['channel'] is channel
        body = consumer.queues[0].get(no_ack=True).payload
        assert (body['pattern'], body['matcher']) == ('w*', 'glob')
        assert body['destination'] is None

    def test_positional_no_reply(self, memory_connection):
        mailbox = CollectingMailbox(unique(), type='fanout')
        consumer = self.published(mailbox, 'w1@h', memory_connection)
        assert mailbox(memory_connection)._broadcast(
            'shutdown', {}, None, False, 1.0, None, None,
            channel=None) is None
        assert CollectingMailbox.collected == []
        body = consumer.queues[0].get(no_ack=True).payload
        assert body['method'] == 'shutdown'
        assert 'ticket' not in body and 'reply_to' not in body

    def test_call_and_multi_call_use_overridden_collect(
            self, memory_connection):
        bound = CollectingMailbox(unique())(memory_connection)
        assert bound.call(['w1'], 'ping', timeout=3) == ['COLLECTED']
        assert bound.multi_call('ping', limit=4, timeout=2) == ['COLLECTED']
        first, second = CollectingMailbox.collected
        assert (first['limit'], first['timeout']) == (1, 3)
        assert (second['limit'], second['timeout']) == (4, 2)

    def test_control_broadcast_goes_through_collect(self):
        class CollectingControl(Control):
            Mailbox = CollectingMailbox

        app = Celery(unique('app'), broker='memory://',
                     set_as_current=False, control=CollectingControl)
        app.conf.control_exchange = unique()
        try:
            assert app.control.broadcast(
                'ping', reply=True, destination=['a', 'b'],
                timeout=4) == ['COLLECTED']
            assert app.control.broadcast(
                'ping', reply=True, timeout=4, limit=1, pattern='a*',
                matcher='glob') == ['COLLECTED']
            first, second = CollectingMailbox.collected
            assert (first['limit'], first['timeout']) == (2, 4)
            assert (second['limit'], second['timeout']) == (1, 4)
        finally:
            app.close()

    def test_destination_must_be_list_or_tuple(self, app,
                                               memory_connection):
        bound = app.control.mailbox(memory_connection)
        for destination in ('w1@h', {'w1@h'}, 42):
            with pytest.raises(ValueError):
                bound._broadcast('ping', {}, destination, True, 1.0, None,
                                 None, channel=None)
        with pytest.raises(ValueError):
            app.control.ping(destination='w1@h', timeout=0.1)
        with pytest.raises(ValueError):
            app.control.broadcast('ping', destination='w1@h')


# -- the worker side, built the way Celery builds it -----------------------

def handler_ping(state, **kwargs):
    return {'ok': 'pong', 'from': state['hostname']}


def handler_boom(state, **kwargs):
    raise ValueError('bad value')


def handler_record(state, **kwargs):
    state['events'].put((state['hostname'], kwargs))
    return 'recorded'


CELERY_STYLE_HANDLERS = {'ping': handler_ping, 'boom': handler_boom,
                         'record': handler_record}


def celery_style_nodes(mailbox, hostnames, events=None):
    """Nodes wired exactly like celery.worker.pidbox.Pidbox.start()."""

    def setup(conn):
        started = []
        for hostname in hostnames:
            node = mailbox.Node(
                hostname, handlers=CELERY_STYLE_HANDLERS,
                state={'hostname': hostname, 'events': events})
            node.channel = conn.channel()
            record = {'node': node, 'decode_errors': queue.Queue(),
                      'command_errors': queue.Queue()}

            def on_message(body, message, node=node, record=record):
                try:
                    node.handle_message(body, message)
                except KeyError as exc:
                    record['command_errors'].put(('KeyError', exc))
                except Exception as exc:
                    record['command_errors'].put(('reset', exc))

            consumer = node.listen(callback=on_message)
            consumer.on_decode_error = (
                lambda message, exc, record=record:
                record['decode_errors'].put(exc))
            record['consumer'] = consumer
            started.append(record)
        return started
    return NodeServer(setup)


class TestCeleryStyleNode:

    def test_node_from_unbound_mailbox(self):
        mailbox = pidbox.Mailbox('celery', type='fanout')
        state = AttributeDict(hostname='w1@h')
        node = mailbox.Node('w1@h', handlers=CELERY_STYLE_HANDLERS,
                            state=state)
        assert node.mailbox is mailbox
        assert node.mailbox.connection is None
        assert node.channel is None
        assert node.state is state
        assert node.handlers is CELERY_STYLE_HANDLERS
        assert node.handle('ping') == {'ok': 'pong', 'from': 'w1@h'}
        with pytest.raises(KeyError):
            node.handle('no_such_command')

    def test_listen_with_callback_on_unbound_mailbox(self):
        mailbox = pidbox.Mailbox(unique(), type='fanout')
        node = mailbox.Node('w1@h', handlers={}, state={})
        with fresh_connection() as conn:
            node.channel = conn.channel()
            callback = Mock(name='callback')
            consumer = node.listen(callback=callback)
            try:
                assert consumer.channel is node.channel
                assert consumer.callbacks == [callback]
                assert consumer.queues[0].name == \
                    f'w1@h.{mailbox.namespace}.pidbox'
                on_decode_error = Mock(name='on_decode_error')
                consumer.on_decode_error = on_decode_error
                assert consumer.on_decode_error is on_decode_error
            finally:
                consumer.cancel()

    @pytest.mark.parametrize('serializer', ['json', 'msgpack'])
    def test_round_trip(self, memory_connection, serializer):
        ns = unique()
        events = queue.Queue()
        kw = {'type': 'fanout', 'serializer': serializer,
              'accept': ['json', 'msgpack']}
        worker_mailbox = pidbox.Mailbox(ns, **kw)   # unbound, as in Celery
        hosts = ['w1@h', 'w2@h']
        with celery_style_nodes(worker_mailbox, hosts, events) as server:
            client = pidbox.Mailbox(ns, **kw)
            bound = client(memory_connection)
            assert bound.call(['w1@h'], 'ping', timeout=DEADLINE) == \
                [{'w1@h': {'ok': 'pong', 'from': 'w1@h'}}]
            assert by_host(client(memory_connection)._broadcast(
                'ping', {}, None, True, DEADLINE * 3, 2, None,
                channel=None)) == {h: {'ok': 'pong', 'from': h}
                                   for h in hosts}
            assert client(memory_connection)._broadcast(
                'record', {'x': 1}, None, True, DEADLINE, 1, None,
                channel=None, pattern='w2@*', matcher='glob') == \
                [{'w2@h': 'recorded'}]
            assert bound.call(['w2@h'], 'boom', timeout=DEADLINE) == \
                [{'w2@h': {'error': "ValueError('bad value')"}}]
            assert bound.call(['w2@h'], 'nope', timeout=DEADLINE) == \
                [{'w2@h': {'error': "KeyError('nope')"}}]
            bound.abcast('record', {'y': 2})
            bound.call(hosts, 'ping', timeout=DEADLINE)   # barrier
            got = sorted(drain_queue(events), key=repr)
            assert got == sorted([('w2@h', {'x': 1}), ('w1@h', {'y': 2}),
                                  ('w2@h', {'y': 2})], key=repr)
            for record in server.value:
                assert drain_queue(record['command_errors']) == []
                assert drain_queue(record['decode_errors']) == []

    @pytest.mark.parametrize('body,field', [
        ([1, 2], 'body'),
        ('ping', 'body'),
        ({'arguments': {}}, 'method'),
        ({'method': 7, 'arguments': {}}, 'method'),
        ({'method': 'record', 'arguments': [1]}, 'arguments'),
        ({'method': 'record', 'arguments': 'x'}, 'arguments'),
    ], ids=['list', 'str', 'no-method', 'int-method', 'list-arguments',
            'str-arguments'])
    def test_malformed_body_does_not_reset(self, memory_connection, caplog,
                                           body, field):
        ns = unique()
        events = queue.Queue()
        worker_mailbox = pidbox.Mailbox(ns, type='fanout')
        caplog.set_level(logging.WARNING)
        with celery_style_nodes(worker_mailbox, ['w1@h'], events) as server:
            bound = pidbox.Mailbox(ns, type='fanout')(memory_connection)
            producer = KombuProducer(memory_connection.channel())
            producer.publish(body, serializer='json',
                             exchange=bound.exchange, routing_key='',
                             declare=[bound.exchange])
            assert bound.call(['w1@h'], 'ping', timeout=DEADLINE) == \
                [{'w1@h': {'ok': 'pong', 'from': 'w1@h'}}]
            (record,) = server.value
            # handle_message never raises into Celery's callback, so Celery
            # would not reset its consumer.
            assert drain_queue(record['command_errors']) == []
        assert drain_queue(events) == []
        assert names_field(caplog, field), warning_texts(caplog)

    @pytest.mark.parametrize('publish,error', [
        ({'body': {'method': 'record', 'arguments': {}},
          'serializer': 'pickle'}, ContentDisallowed),
        ({'body': b'\xff\xfe\x00{', 'content_type': 'application/json',
          'content_encoding': 'utf-8'}, DecodeError),
    ], ids=['pickle', 'undecodable'])
    def test_decode_errors_go_to_replaced_handler(self, memory_connection,
                                                  publish, error):
        ns = unique()
        events = queue.Queue()
        worker_mailbox = pidbox.Mailbox(ns, type='fanout')
        with celery_style_nodes(worker_mailbox, ['w1@h'], events) as server:
            bound = pidbox.Mailbox(ns, type='fanout')(memory_connection)
            producer = KombuProducer(memory_connection.channel())
            producer.publish(exchange=bound.exchange, routing_key='',
                             declare=[bound.exchange], **publish)
            assert bound.call(['w1@h'], 'ping', timeout=DEADLINE) == \
                [{'w1@h': {'ok': 'pong', 'from': 'w1@h'}}]
            (record,) = server.value
            errors = drain_queue(record['decode_errors'])
        assert len(errors) == 1
        assert isinstance(errors[0], error)
        assert drain_queue(events) == []


# -- a real celery.worker.pidbox.Pidbox on a pidbox mailbox ----------------

class TestCeleryWorkerPidbox:

    def test_node_built_by_celery(self, app):
        c = FakeWorkerConsumer(app, 'w1@h', None)
        box = Pidbox(c)
        assert isinstance(box.node, pidbox.Node)
        assert box.node.mailbox is app.control.mailbox
        assert box.node.hostname == 'w1@h'
        assert box.node.handlers is worker_control.Panel.data
        assert box.node.handle('ping') == {'ok': 'pong'}
        assert box.node.handle('clock') == {'clock': app.clock.value}
        with pytest.raises(KeyError):
            box.node.handle('no_such_command_here')

    def test_control_commands(self, app):
        hosts = ['w1@h', 'w2@h']
        with celery_workers(app, hosts) as server:
            assert app.control.ping(destination=['w1@h'],
                                    timeout=DEADLINE) == \
                [{'w1@h': {'ok': 'pong'}}]
            assert by_host(app.control.ping(destination=hosts,
                                            timeout=DEADLINE)) == \
                {h: {'ok': 'pong'} for h in hosts}
            assert app.control.inspect(destination=hosts,
                                       timeout=DEADLINE).ping() == \
                {h: {'ok': 'pong'} for h in hosts}
            assert app.control.inspect(timeout=DEADLINE, limit=1,
                                       pattern='w2@*',
                                       matcher='glob').ping() == \
                {'w2@h': {'ok': 'pong'}}
            assert app.control.inspect(timeout=DEADLINE, limit=1,
                                       pattern=r'w1@\w$',
                                       matcher='pcre').ping() == \
                {'w1@h': {'ok': 'pong'}}
            clocks = app.control.inspect(destination=['w1@h'],
                                         timeout=DEADLINE).clock()
            assert isinstance(clocks['w1@h']['clock'], int)
            assert app.control.broadcast(
                'no_such_command', reply=True, destination=['w2@h'],
                timeout=DEADLINE) == \
                [{'w2@h': {'error': "KeyError('no_such_command')"}}]
            # a cast (no reply), then a call as a barrier
            assert app.control.enable_events(destination=['w2@h']) is None
            app.control.ping(destination=hosts, timeout=DEADLINE)
            (box1, c1), (box2, c2) = server.value
            assert 'task' in c2.event_dispatcher.groups
            assert 'task' not in c1.event_dispatcher.groups
            assert box1.resets == box2.resets == 0

    def test_inspect_without_limit_honours_total_timeout(self, app):
        with celery_workers(app, ['w1@h', 'w2@h']):
            start = monotonic()
            replies = app.control.inspect(timeout=1.0).ping()
            elapsed = monotonic() - start
            assert replies == {'w1@h': {'ok': 'pong'},
                               'w2@h': {'ok': 'pong'}}
            assert elapsed < 3.0, elapsed

    def test_malformed_requests_do_not_reset(self, app, caplog):
        caplog.set_level(logging.WARNING)
        with celery_workers(app, ['w1@h']) as server:
            mailbox = app.control.mailbox
            with app.connection_for_write() as conn:
                producer = KombuProducer(conn.channel())
                for body in ([1, 2], {'arguments': {}},
                             {'method': ['ping']},
                             {'method': 'ping', 'arguments': [1]}):
                    producer.publish(body, serializer='json',
                                     exchange=mailbox.exchange,
                                     routing_key='',
                                     declare=[mailbox.exchange])
                producer.publish({'method': 'ping'}, serializer='pickle',
                                 exchange=mailbox.exchange, routing_key='',
                                 declare=[mailbox.exchange])
            assert app.control.ping(destination=['w1@h'],
                                    timeout=DEADLINE) == \
                [{'w1@h': {'ok': 'pong'}}]
            ((box, c),) = server.value
            assert box.resets == 0
            decode_errors = drain_queue(c.decode_errors)
        assert len(decode_errors) == 1
        assert isinstance(decode_errors[0], ContentDisallowed)
        assert not any('Control command error' in text
                       for text in warning_texts(caplog))
        for field in ('body', 'method', 'arguments'):
            assert names_field(caplog, field), (field, warning_texts(caplog))


# -- mixed wire: Celery's stock (kombu) side against pidbox ----------------

@pytest.mark.parametrize('serializer', ['json', 'msgpack'])
@pytest.mark.parametrize('client_pidbox,worker_pidbox', [
    (False, True), (True, False), (True, True),
], ids=['kombu-client-pidbox-worker', 'pidbox-client-kombu-worker',
        'pidbox-both'])
def test_mixed_celery_wire(client_pidbox, worker_pidbox, serializer):
    ns = unique()
    client_app = make_app(ns, use_pidbox=client_pidbox,
                          serializer=serializer)
    worker_app = make_app(ns, use_pidbox=worker_pidbox,
                          serializer=serializer)
    try:
        expected_cls = pidbox.Mailbox if worker_pidbox \
            else kombu_pidbox.Mailbox
        assert type(worker_app.control.mailbox) is expected_cls
        hosts = ['w1@h', 'w2@h']
        with celery_workers(worker_app, hosts) as server:
            control = client_app.control
            assert control.ping(destination=['w1@h'], timeout=DEADLINE) == \
                [{'w1@h': {'ok': 'pong'}}]
            assert control.inspect(destination=hosts,
                                   timeout=DEADLINE).ping() == \
                {h: {'ok': 'pong'} for h in hosts}
            assert control.inspect(timeout=DEADLINE, limit=1,
                                   pattern='w2*', matcher='glob').ping() == \
                {'w2@h': {'ok': 'pong'}}
            assert control.broadcast(
                'no_such_command', reply=True, destination=['w1@h'],
                timeout=DEADLINE) == \
                [{'w1@h': {'error': "KeyError('no_such_command')"}}]
            control.enable_events(destination=['w1@h'])
            control.ping(destination=hosts, timeout=DEADLINE)  # barrier
            (box1, c1), (box2, c2) = server.value
            assert 'task' in c1.event_dispatcher.groups
            assert 'task' not in c2.event_dispatcher.groups
            assert box1.resets == box2.resets == 0
    finally:
        client_app.close()
        worker_app.close()
