"""Bounded fuzzing of a whole Node over kombu's in-memory transport.

Hostile raw messages (kombu ``Producer.publish`` of raw bytes with a content
type, content encoding and headers of our choosing) go to a listening node's
queue, interleaved with good ``ping`` calls.  After every batch:

- the good call is still answered (nothing raised out of ``drain_events``,
  the consumer is still consuming);
- each bad message left exactly one ERROR record naming the field that was
  wrong (``body:``, ``method:``, ``destination:``...), in order, and
  messages that were fine or not for this node left none.

What a message should do is asked of the pure core's ``Dispatcher.decode``
(the differential tests prove the compiled one decides the same); the node
under test runs with the core from the ``core`` fixture.
"""

from __future__ import annotations

import collections
import logging
import os

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kombu import Producer
from kombu.exceptions import ContentDisallowed
from kombu.utils.json import dumps as kombu_dumps
from kombu.utils.json import loads as kombu_json_loads

import pidbox
from pidbox import _core
from pidbox.exceptions import ROUTE_HEADER, MalformedRequest

HOSTNAME = 'fuzz@host'
OTHER = 'other@host'
SCALE = max(1, int(os.environ.get('PIDBOX_FUZZ_SCALE', '1') or 1))

#: inputs published per core (printed after the module)
COUNTS: collections.Counter = collections.Counter()


@pytest.fixture(scope='module', autouse=True)
def _report_counts(request):
    yield
    plugins = request.config.pluginmanager
    reporter = plugins.getplugin('terminalreporter')
    capture = plugins.getplugin('capturemanager')
    if reporter is not None and capture is not None and COUNTS:
        with capture.global_and_fixture_disabled():
            reporter.write_line('')
            reporter.write_line('node fuzz: ' + ', '.join(
                f'{k}={v}' for k, v in sorted(COUNTS.items())))


# -- hostile messages --------------------------------------------------------

JSON_CT = 'application/json'
MSGPACK_CT = 'application/x-msgpack'

text = st.text(max_size=8)
values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70),
              st.floats(), text),
    lambda kids: st.one_of(st.lists(kids, max_size=3),
                           st.dictionaries(text, kids, max_size=3)),
    max_leaves=8)
methods = st.one_of(st.sampled_from(['ping', 'nope', '__class__', '__init__',
                                     'handlers', 'a.b.c', '']), text)
destinations = st.one_of(
    st.none(), st.just([HOSTNAME]), st.just([OTHER]), st.just([]),
    st.just(HOSTNAME), st.just('fuzz'), st.lists(text, max_size=2))


@st.composite
def requests(draw):
    body = {}
    for key, good in [('method', methods),
                      ('arguments', st.one_of(st.none(), st.dictionaries(
                          st.sampled_from(['a', '1a', 'a-b', 'state']),
                          values, max_size=2))),
                      ('destination', destinations),
                      ('pattern', st.sampled_from(['fuzz*', '*', 'x*', '(',
                                                   'fuzz.*'])),
                      ('matcher', st.sampled_from(['glob', 'pcre', 'nope'])),
                      ('ticket', st.uuids().map(str)),
                      ('reply_to', st.fixed_dictionaries({
                          # not the request exchange: a reply sent there comes
                          # back as a malformed request one batch later
                          'exchange': st.sampled_from([
                              'reply.fuzz.pidbox', '', 'no.such.exchange']),
                          'routing_key': st.sampled_from(['', 'nobody']),
                      }))]:
        kind = draw(st.integers(0, 9))
        if kind < 6:
            body[key] = draw(good)
        elif kind < 8:
            body[key] = draw(values)  # any type in any field
    return body


HOSTILE_TOKENS = [b'NaN', b'\xff', b'\xc1', b'\\', b'"', b'{', b']', b'\x00',
                  b'\xdb\xff\xff\xff\xff', b'\xdd\xff\xff\xff\xff',
                  b'\xdf\xff\xff\xff\xff', b'[' * 3000, b'\xed\xa0\x80']


@st.composite
def mutate(draw, data: bytes) -> bytes:
    data = bytearray(data)
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(data)))
        op = draw(st.integers(0, 3))
        if op == 0:
            del data[at:]
        elif op == 1 and data:
            data[min(at, len(data) - 1)] = draw(st.integers(0, 255))
        elif op == 2:
            data[at:at] = draw(st.sampled_from(HOSTILE_TOKENS))
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=3))
    return bytes(data)


@st.composite
def hostile_messages(draw):
    """(body bytes, content_type, content_encoding, headers)."""
    kind = draw(st.integers(0, 9))
    req = draw(requests())
    if kind <= 5:
        content_type = JSON_CT
        try:
            data = kombu_dumps(req).encode('utf-8', 'surrogatepass')
        except ValueError:
            data = b'{}'
    elif kind <= 8:
        content_type = MSGPACK_CT
        try:
            data = msgpack.packb(req, use_bin_type=True,
                                 unicode_errors='surrogatepass')
        except (OverflowError, ValueError, TypeError):
            data = b'\x80'
    else:
        content_type = draw(st.sampled_from([
            JSON_CT, MSGPACK_CT, 'application/x-python-serialize',
            'application/x-yaml', 'text/unknown', 'application/data']))
        data = draw(st.binary(max_size=40))
    data = draw(mutate(data))
    if draw(st.integers(0, 9)) == 0:
        content_type = draw(st.sampled_from([
            'application/x-python-serialize', 'application/x-yaml',
            'text/unknown', JSON_CT, MSGPACK_CT]))
    encoding = draw(st.sampled_from(['utf-8', 'binary', 'latin-1', 'nope']))
    headers = draw(st.one_of(
        st.just({}),
        st.just({'clock': 3}),
        st.builds(lambda d, p, m: {ROUTE_HEADER: [d, p, m]},
                  destinations, st.sampled_from([None, 'fuzz*', '(']),
                  st.sampled_from([None, 'glob', 'pcre', 'nope'])),
        st.dictionaries(st.sampled_from([ROUTE_HEADER, 'clock']), values,
                        max_size=2)))
    return data, content_type, encoding, headers


def expected_log(data, content_type, encoding, headers):
    """The field the node must log for this message, or None for no log.

    ``'-'`` stands for a good request the node runs with no error;
    ``'no such command'`` for one whose method has no handler.
    """
    # headers travel through the transport's JSON, as the node sees them
    headers = kombu_json_loads(kombu_dumps(headers))
    dispatcher = _core.pure.Dispatcher(HOSTNAME, {JSON_CT, MSGPACK_CT})
    try:
        request = dispatcher.decode(data, content_type, encoding, headers)
    except MalformedRequest as exc:
        return f'{exc.field}:'
    except ContentDisallowed:
        return 'Refusing'
    if request is None:
        return None
    if request['method'] == 'ping':
        return '-'
    return 'no such command'


# -- the node ----------------------------------------------------------------

def ping(state, **kwargs):
    return 'pong'


def publish_raw(conn, exchange, data, content_type, encoding, headers):
    producer = Producer(conn.default_channel)
    producer.publish(data, exchange=exchange, routing_key='',
                     content_type=content_type, content_encoding=encoding,
                     headers=headers)


@pytest.fixture
def bound(memory_connection):
    return pidbox.Mailbox('fuzz', type='fanout',
                          accept=['json', 'msgpack'])(memory_connection)


def test_node_survives_hostile_messages(core, bound, caplog):
    conn = bound.connection
    node = bound.Node(HOSTNAME, state={}, channel=conn.channel(),
                      handlers={'ping': ping})
    assert type(node.get_dispatcher()) is core.Dispatcher
    consumer = node.listen()
    bound.exchange(conn.default_channel).declare()
    assert bound.call([HOSTNAME], 'ping', timeout=5) == [{HOSTNAME: 'pong'}]
    core_id = 'c' if core is _core.compiled else 'py'

    @settings(max_examples=150 * SCALE, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(hostile_messages(), min_size=1, max_size=5))
    def batch(messages):
        expected = [expected_log(*m) for m in messages]
        caplog.clear()
        for m in messages:
            publish_raw(conn, bound.exchange.name, *m)
        COUNTS[f'hostile[{core_id}]'] += len(messages)
        # the queue is FIFO: when the reply is here, the batch was handled
        replies = bound.call([HOSTNAME], 'ping', timeout=5)
        COUNTS[f'ping[{core_id}]'] += 1
        assert replies == [{HOSTNAME: 'pong'}], (replies, messages)
        errors = [r.getMessage() for r in caplog.records
                  if r.levelno >= logging.ERROR]
        wanted = [e for e in expected if e not in (None, '-')]
        assert len(errors) == len(wanted), (errors, expected, messages)
        for want, got in zip(wanted, errors):
            assert want in got, (want, got, messages)
        assert 'cannot route message' not in ' '.join(errors)

    with caplog.at_level(logging.ERROR):
        batch()
    assert consumer._active_tags, 'the node stopped consuming'


@pytest.mark.parametrize('data,content_type,headers', [
    (b'[' * 100_000, JSON_CT, {}),
    (b'{"method":"ping","arguments":' + b'[' * 100_000, JSON_CT, {}),
    (b'{"method":"ping","arguments":' + b'[{"a":' * 50_000, JSON_CT,
     {ROUTE_HEADER: [None, None, None]}),
    (b'\x81\xa6method' + b'\x91' * 100_000, MSGPACK_CT, {}),
    (b'\x81\xa6method\xdb\xff\xff\xff\xff', MSGPACK_CT,
     {ROUTE_HEADER: [None, None, None]}),
    (b'\xdf\xff\xff\xff\xff', MSGPACK_CT, {}),
])
def test_node_survives_blowups(core, bound, caplog, data, content_type,
                               headers):
    conn = bound.connection
    node = bound.Node(HOSTNAME, state={}, channel=conn.channel(),
                      handlers={'ping': ping})
    node.listen()
    bound.exchange(conn.default_channel).declare()
    with caplog.at_level(logging.ERROR):
        publish_raw(conn, bound.exchange.name, data, content_type, 'utf-8',
                    headers)
        assert bound.call([HOSTNAME], 'ping', timeout=5) == [
            {HOSTNAME: 'pong'}]
    errors = [r.getMessage() for r in caplog.records
              if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and 'body:' in errors[0], errors
    COUNTS['blowups'] += 1
