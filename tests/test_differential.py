"""Differential tests: the compiled core and its pure twin, fed the same input.

Every input goes to both ``pidbox._dispatch`` (Cython) and
``pidbox._dispatch_py`` and the outcomes must be identical: the same return
value (compared by type and ``repr``, so NaN and ``-0.0`` count), or the same
exception type with the same message (so :class:`MalformedRequest` names the
same field for the same reason).  Messages that a core accepts as addressed
are also checked against kombu itself: kombu's ``serialization.loads`` must
give the same request, and kombu's ``Node.handle_message`` rule the same
addressing decision whenever that rule does not raise.

Inputs are valid requests in JSON (random whitespace, key order, duplicate and
escaped keys) and msgpack (duplicate, non-str and non-minimally encoded keys),
with and without the ``pidbox-route`` header, then the same bytes mutated:
truncated at every offset, bytes flipped, inserted and deleted, hostile tokens
spliced in (invalid UTF-8, NaN, 0xc1, length fields claiming gigabytes,
deep nesting).  Settings are bounded; the module runs in seconds.
"""

from __future__ import annotations

import collections
import fnmatch
import importlib.machinery
import inspect
import json
import os

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kombu import matcher as kombu_matcher
from kombu.clocks import LamportClock
from kombu.exceptions import ContentDisallowed
from kombu.serialization import loads as kombu_loads
from kombu.serialization import prepare_accept_content
from kombu.utils.json import dumps as kombu_dumps

from pidbox import _core
from pidbox._codec import MAX_JSON_DEPTH
from pidbox.exceptions import (
    INSECURE_CONTENT, ROUTE_HEADER, ROUTING_KEYS, MalformedRequest,
)

C = _core.compiled
P = _core.pure

pytestmark = pytest.mark.skipif(
    C is None, reason='compiled core not loaded (PIDBOX_NO_EXTENSIONS set, '
                      'or the extension was not built): nothing to compare')

JSON_CT = 'application/json'
MSGPACK_CT = 'application/x-msgpack'

#: how many inputs each test fed to both cores (printed after the module).
COUNTS: collections.Counter = collections.Counter()

#: PIDBOX_FUZZ_SCALE=10 runs every test on ten times as many examples.
SCALE = max(1, int(os.environ.get('PIDBOX_FUZZ_SCALE', '1') or 1))


def examples(n: int) -> int:
    return n * SCALE


SETTINGS = settings(
    max_examples=examples(400), deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.filter_too_much],
)


@pytest.fixture(scope='module', autouse=True)
def _report_counts(request):
    yield
    plugins = request.config.pluginmanager
    reporter = plugins.getplugin('terminalreporter')
    capture = plugins.getplugin('capturemanager')
    if reporter is not None and capture is not None and COUNTS:
        with capture.global_and_fixture_disabled():
            reporter.write_line('')
            reporter.write_line('differential inputs fed to both cores: ' +
                                ', '.join(f'{k}={v}' for k, v in
                                          sorted(COUNTS.items())) +
                                f' (total {sum(COUNTS.values())})')


# -- outcomes --------------------------------------------------------------

def outcome(fn):
    """What a call did: its value (by type and repr) or its exception."""
    try:
        value = fn()
    except Exception as exc:
        extra = ((exc.field, exc.reason)
                 if isinstance(exc, MalformedRequest) else None)
        return ('raise', type(exc), str(exc), extra)
    return ('ok', type(value), repr(value))


def same(fn, counter):
    """Run ``fn(core)`` on both cores; assert the same outcome; return it."""
    COUNTS[counter] += 1
    c = outcome(lambda: fn(C))
    p = outcome(lambda: fn(P))
    assert c == p, f'cores differ:\n  compiled: {c!r}\n  pure:     {p!r}'
    return p


def decode_both(hostname, accept, body, content_type, content_encoding,
                headers, counter):
    return same(
        lambda core: core.Dispatcher(hostname, accept).decode(
            body, content_type, content_encoding, headers), counter)


WIRE_ERRORS = (MalformedRequest, ContentDisallowed)


def assert_wire_safe(result):
    """Wire-shaped input may only fail with the two documented errors."""
    if result[0] == 'raise':
        assert issubclass(result[1], WIRE_ERRORS), result


# -- kombu's own rule ------------------------------------------------------

def kombu_addressed(hostname, body):
    """kombu.pidbox.Node.handle_message's decision, statement for statement."""
    destination = body.get('destination')
    pattern = body.get('pattern')
    matcher = body.get('matcher')
    if destination:
        return hostname in destination
    elif pattern and matcher:
        return bool(kombu_matcher.match(hostname, pattern, matcher))
    return True


def kombu_decodes(body, content_type, content_encoding, accept):
    """kombu's own decode, or None when kombu refuses or fails."""
    if accept is None:
        if content_type in INSECURE_CONTENT:
            return None  # pidbox refuses these on purpose
        kw = {'force': True}
    else:
        kw = {'accept': accept}
    try:
        return (kombu_loads(body, content_type, content_encoding, **kw),)
    except Exception:
        return None


def check_against_kombu(hostname, accept, body, content_type,
                        content_encoding, headers, result):
    """Where kombu decodes a request, pidbox must decide and decode alike.

    An addressed request must be what kombu's ``serialization.loads`` gives
    (then shape-checked); kombu's ``Node.handle_message`` rule must agree on
    the addressing whenever it does not raise; a request kombu would skip
    must give None.
    """
    decoded = kombu_decodes(body, content_type, content_encoding, accept)
    if result[0] == 'ok' and result[1] is dict:
        assert decoded is not None, 'pidbox decoded what kombu cannot'
        assert repr(decoded[0]) == result[2], 'kombu decodes it differently'
    if decoded is None or not isinstance(decoded[0], dict):
        return
    decoded = decoded[0]
    route = headers.get(ROUTE_HEADER) if isinstance(headers, dict) else None
    if route is not None and (
            not isinstance(route, (list, tuple)) or
            list(route) != [decoded.get(k) for k in ROUTING_KEYS]):
        return  # the header, not the body, decides
    try:
        wanted = kombu_addressed(hostname, decoded)
    except Exception:
        return
    if wanted:
        assert result == outcome(lambda: P.validate(decoded)), (
            'kombu would run this request', result)
    else:
        assert result == ('ok', type(None), 'None'), (
            'kombu would not run this request', result)


# -- strategies ------------------------------------------------------------

HOSTNAMES = st.sampled_from([
    'w1', 'worker1@example.com', 'celery@host-1.a.b', 'w\u00e9@\u4e2d\u6587',
    'a', '', 'w1.pidbox', '[w]', 'w\ud800x',
])
unicode_text = st.text(
    alphabet=st.characters(blacklist_categories=('Cs',)), max_size=12)
any_text = st.one_of(unicode_text, st.text(max_size=6))  # incl. surrogates

METHODS = st.one_of(
    st.sampled_from(['ping', 'stats', '__class__', '__init__', '__dict__',
                     'handlers', 'a.b.c', '', ' ', 'dispatch', 'handle',
                     'state', 'method', '\x00', 'pi\u0301ng']),
    unicode_text,
)
ARG_KEYS = st.one_of(
    st.sampled_from(['a', 'state', 'self', '1a', 'a-b', '', 'class',
                     '__class__', 'for', '\u00fc', 'a b', '**', 'method']),
    unicode_text,
)
FLOATS = st.floats(allow_nan=True, allow_infinity=True)
MP_INTS = st.integers(min_value=-2 ** 63, max_value=2 ** 64 - 1)

json_scalars = st.one_of(st.none(), st.booleans(),
                         st.integers(min_value=-2 ** 80, max_value=2 ** 80),
                         FLOATS, any_text)
json_values = st.recursive(
    json_scalars,
    lambda kids: st.one_of(st.lists(kids, max_size=4),
                           st.dictionaries(any_text, kids, max_size=4)),
    max_leaves=12)
mp_scalars = st.one_of(st.none(), st.booleans(), MP_INTS, FLOATS,
                       unicode_text, st.binary(max_size=8))
mp_values = st.recursive(
    mp_scalars,
    lambda kids: st.one_of(st.lists(kids, max_size=4),
                           st.dictionaries(unicode_text, kids, max_size=4)),
    max_leaves=12)


def destinations(hostname):
    return st.one_of(
        st.none(),
        st.lists(st.one_of(st.just(hostname), HOSTNAMES, unicode_text),
                 max_size=4),
        st.just([hostname]), st.just([]),
        st.one_of(st.just(hostname), HOSTNAMES, unicode_text),  # substring
        st.just(hostname[:2]), st.just(''),
    )


def patterns(hostname):
    return st.one_of(
        st.none(), st.just(''), st.just(hostname), st.just('*'),
        st.just(hostname[:1] + '*'), st.just('*' + hostname[-1:]),
        st.sampled_from(['w?', '[a-z]1', '[!w]*', 'w.*', '.*', '(', ')',
                         '[', '\\', '(?P<x', 'w1$', '^w', '*@*', '**',
                         '(a)\\2', '\u00e9*', '[\u00e9]']),
        unicode_text,
    )


MATCHERS = st.one_of(
    st.none(), st.sampled_from(['glob', 'pcre', 'unknown', '', 'GLOB',
                                'regex', 'glob ']),
    unicode_text)

RESERVED = st.sampled_from(['destination', 'pattern', 'matcher', 'method',
                            'arguments', 'reply_to', 'ticket'])


@st.composite
def requests(draw, hostname, values=json_values, wild=True):
    """A request dict: mostly well formed, any field possibly wrong."""
    def field(good):
        if wild and draw(st.integers(0, 7)) == 0:
            return draw(values)
        return draw(good)

    body = {}
    if draw(st.integers(0, 15)):
        body['method'] = field(METHODS)
    if draw(st.booleans()):
        body['arguments'] = field(st.one_of(
            st.none(), st.dictionaries(ARG_KEYS, values, max_size=4)))
    if draw(st.booleans()):
        body['destination'] = field(destinations(hostname))
    if draw(st.booleans()):
        body['pattern'] = field(patterns(hostname))
        body['matcher'] = field(MATCHERS)
    if draw(st.booleans()):
        body['reply_to'] = field(st.fixed_dictionaries({
            'exchange': st.just('reply.celery.pidbox'),
            'routing_key': unicode_text}))
        body['ticket'] = field(st.uuids().map(str))
    for key in draw(st.lists(st.one_of(RESERVED, unicode_text),
                             max_size=2)):
        body.setdefault(key, draw(values))
    keys = list(body)
    order = draw(st.permutations(keys))
    return {k: body[k] for k in order}


WS = st.sampled_from(['', ' ', '\n', '\t', '\r\n  ', '   '])


def _escape_key(key: str, mask: list) -> str:
    out = []
    for ch, esc in zip(key, mask):
        if esc and ord(ch) < 0x10000:
            out.append('\\u%04x' % ord(ch))
        else:
            out.append(json.dumps(ch)[1:-1])
    return '"' + ''.join(out) + '"'


@st.composite
def json_documents(draw, body):
    """``body`` as JSON text: random spacing, escaped keys, duplicate keys.

    A duplicate key is a decoy emitted before the real one: JSON keeps the
    last, so the document still means ``body``.
    """
    ensure_ascii = draw(st.booleans())
    item_sep = draw(WS) + ',' + draw(WS)
    key_sep = draw(WS) + ':' + draw(WS)
    parts = []
    for key, value in body.items():
        dup = draw(st.integers(0, 9)) == 0
        for val in ([draw(json_values)] if dup else []) + [value]:
            if draw(st.integers(0, 4)) == 0:
                mask = draw(st.lists(st.booleans(), min_size=len(key),
                                     max_size=len(key)))
                key_text = _escape_key(key, mask)
            else:
                key_text = json.dumps(key, ensure_ascii=ensure_ascii)
            parts.append(key_text + key_sep + kombu_dumps(
                val, ensure_ascii=ensure_ascii,
                separators=(draw(st.sampled_from([',', ', ', ' ,\n'])),
                            draw(st.sampled_from([':', ': ', ' :\t'])))))
    return (draw(WS) + '{' + draw(WS) + item_sep.join(parts) + draw(WS) +
            '}' + draw(WS))


def _packb(value) -> bytes:
    return msgpack.packb(value, use_bin_type=True,
                         unicode_errors='surrogatepass')


def _mp_map_header(n: int, wide: int) -> bytes:
    if wide == 0 and n < 16:
        return bytes([0x80 | n])
    if wide <= 1 and n < 0x10000:
        return b'\xde' + n.to_bytes(2, 'big')
    return b'\xdf' + n.to_bytes(4, 'big')


def _mp_key(key, wide: int) -> bytes:
    """A str key in the shortest or a longer (still valid) encoding."""
    if not isinstance(key, str) or wide == 0:
        return _packb(key)
    raw = key.encode('utf-8', 'surrogatepass')
    if wide == 1 and len(raw) < 0x100:
        return b'\xd9' + bytes([len(raw)]) + raw
    if wide == 2 and len(raw) < 0x10000:
        return b'\xda' + len(raw).to_bytes(2, 'big') + raw
    return b'\xdb' + len(raw).to_bytes(4, 'big') + raw


@st.composite
def msgpack_documents(draw, body):
    """``body`` as msgpack: decoy duplicates, bytes/int keys, wide headers."""
    pairs = []
    for key, value in body.items():
        if draw(st.integers(0, 9)) == 0:
            pairs.append((key, draw(mp_values)))
        pairs.append((key, value))
    if draw(st.integers(0, 9)) == 0:  # a non-str key: a bin twin of a field
        key = draw(RESERVED)
        pairs.insert(draw(st.integers(0, len(pairs))),
                     (key.encode(), draw(mp_values)))
    if draw(st.integers(0, 19)) == 0:
        pairs.append((draw(st.integers(-5, 5)), None))
    return _mp_map_header(len(pairs), draw(st.integers(0, 2))) + b''.join(
        _mp_key(k, draw(st.integers(0, 3))) + _packb(v) for k, v in pairs)


HOSTILE_TOKENS = [
    b'NaN', b'Infinity', b'-Infinity', b'nan', b'\xff', b'\xfe', b'\xc0\x80',
    b'\xed\xa0\x80', b'\xc3(', b'\xf4\x90\x80\x80', b'\xc1', b'\\', b'"',
    b'\\u', b'\\ud800', b'{', b'}', b'[', b']', b',', b':', b'\x00',
    b'\xdb\xff\xff\xff\xff', b'\xdd\xff\xff\xff\xff', b'\xdf\xff\xff\xff\xff',
    b'\xc6\x7f\xff\xff\xff', b'\xc9\xff\xff\xff\xf0\x01', b'\xd8\x01',
    b'\x9f', b'\x8f', b'\xa5hello', b'1e999999', b'-0', b'[' * 64,
    b'{"a":' * 32, b'"destination"', b'"destinatio\\u006e"', b'\xabdestination',
    b'\xa7pattern', b'\xa7matcher', b'\xa6method', b'\xef\xbb\xbf',
]
#: by name, so a failing example prints a name, not 200 kB
BLOWUPS = {
    'arrays': b'[' * 100_000, 'objects': b'{"a":' * 50_000,
    'mixed': b'[{"a":' * 40_000, 'mp_arrays': b'\x91' * 100_000,
    'mp_maps': b'\x81\xa1a' * 40_000,
}


@st.composite
def mutated(draw, data: bytes):
    """``data`` after 1-4 random edits: flips, inserts, deletes, splices."""
    data = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.integers(0, 6))
        at = draw(st.integers(0, len(data)))
        if op == 0 and data:  # flip one byte
            at = min(at, len(data) - 1)
            data[at] = draw(st.integers(0, 255))
        elif op == 1:  # insert random bytes
            data[at:at] = draw(st.binary(min_size=1, max_size=4))
        elif op == 2:  # delete a slice
            data[at:at + draw(st.integers(1, 8))] = b''
        elif op == 3:  # splice a hostile token
            data[at:at] = draw(st.sampled_from(HOSTILE_TOKENS))
        elif op == 4:  # trailing data
            data += draw(st.sampled_from([b' x', b'}', b'\x00', b'\xc0',
                                          b'{}', b'\n\n']))
        elif op == 5:  # truncate
            del data[at:]
        else:  # replace a byte with a structural one
            if data:
                at = min(at, len(data) - 1)
                data[at] = draw(st.sampled_from(b'{}[]",:\\\x80\xc1\xdf'))
    return bytes(data)


ACCEPTS = st.sampled_from([None, ['json'], ['json', 'msgpack'], ['msgpack'],
                           ['application/json'], []])
ENCODINGS = st.sampled_from(['utf-8', 'binary', None, 'latin-1', 'latin-1',
                             'ascii', 'utf-16', 'nope', 'UTF-8'])
CONTENT_TYPES = st.sampled_from([
    JSON_CT, MSGPACK_CT, 'application/x-python-serialize',
    'application/x-yaml', 'application/data', 'application/text', None,
    'text/unknown', 'application/json ', 'APPLICATION/JSON',
])


def prepared(accept):
    return None if accept is None else prepare_accept_content(accept)


@st.composite
def route_headers(draw, body):
    """None, {}, a route header that matches the body, or any other one."""
    kind = draw(st.integers(0, 5))
    if kind == 0:
        return None
    if kind == 1:
        return {'clock': draw(st.integers(0, 9))}
    if kind <= 3 and isinstance(body, dict):
        return {ROUTE_HEADER: [body.get(k) for k in ROUTING_KEYS],
                'clock': 1}
    if kind == 4:
        hostname = draw(HOSTNAMES)
        return {ROUTE_HEADER: draw(st.tuples(
            destinations(hostname), patterns(hostname), MATCHERS))}
    return {ROUTE_HEADER: draw(st.one_of(
        json_values, st.lists(json_values, max_size=5),
        st.tuples(json_values, json_values)))}


@st.composite
def wire_messages(draw, mutate=False):
    """(hostname, accept, body, content_type, content_encoding, headers)."""
    hostname = draw(HOSTNAMES)
    fmt = draw(st.sampled_from(['json', 'msgpack']))
    if fmt == 'json':
        req = draw(requests(hostname))
        data = draw(json_documents(req)).encode('utf-8', 'surrogatepass')
        content_type = JSON_CT
    else:
        req = draw(requests(hostname, values=mp_values))
        data = draw(msgpack_documents(req))
        content_type = MSGPACK_CT
    if mutate:
        data = draw(mutated(data))
    if draw(st.integers(0, 9)) == 0:
        content_type = draw(CONTENT_TYPES)
    encoding = 'utf-8' if fmt == 'json' else 'binary'
    if draw(st.integers(0, 9)) == 0:
        encoding = draw(ENCODINGS)
    body = data
    shape = draw(st.integers(0, 9))
    if shape == 0 and fmt == 'json':
        body = data.decode('utf-8', 'replace')
    elif shape == 1:
        body = bytearray(data)
    elif shape == 2:
        body = memoryview(data)
    return (hostname, prepared(draw(ACCEPTS)), body, content_type, encoding,
            draw(route_headers(req)))


# -- decode ----------------------------------------------------------------

@SETTINGS
@given(wire_messages())
def test_valid_messages_decode_the_same_and_as_kombu(msg):
    result = decode_both(*msg, counter='valid')
    assert_wire_safe(result)
    check_against_kombu(*msg, result)


@settings(SETTINGS, max_examples=examples(600))
@given(wire_messages(mutate=True))
def test_mutated_messages_decode_the_same(msg):
    result = decode_both(*msg, counter='mutated')
    assert_wire_safe(result)
    check_against_kombu(*msg, result)


@settings(SETTINGS, max_examples=examples(60))
@given(wire_messages())
def test_every_truncation_decodes_the_same(msg):
    hostname, accept, body, content_type, encoding, headers = msg
    data = bytes(body.encode('utf-8', 'surrogatepass')
                 if isinstance(body, str) else body)
    for end in range(len(data) + 1):
        m = (hostname, accept, data[:end], content_type, encoding, headers)
        result = decode_both(*m, counter='truncated')
        assert_wire_safe(result)
        check_against_kombu(*m, result)


@SETTINGS
@given(HOSTNAMES, ACCEPTS, st.binary(max_size=64), CONTENT_TYPES, ENCODINGS,
       st.one_of(st.none(), st.just({}),
                 st.dictionaries(st.sampled_from([ROUTE_HEADER, 'clock']),
                                 json_values, max_size=2)))
def test_random_bytes_decode_the_same(hostname, accept, data, content_type,
                                      encoding, headers):
    m = (hostname, prepared(accept), data, content_type, encoding, headers)
    result = decode_both(*m, counter='random_bytes')
    assert_wire_safe(result)


@settings(SETTINGS, max_examples=examples(150))
@given(HOSTNAMES, st.sampled_from([JSON_CT, MSGPACK_CT]),
       st.sampled_from(sorted(BLOWUPS)), st.sampled_from([b'', b'{"method":"x",',
                                                   b'\x82\xa6method\xa1x']),
       st.sampled_from(['', 'destination', 'arguments', 'pattern']),
       st.booleans())
def test_blowups_decode_the_same(hostname, content_type, blowup, prefix, key,
                                 routed):
    """Deep nesting, huge claimed lengths: same error, no hang, no crash."""
    blowup = BLOWUPS[blowup]
    if key:
        if content_type == JSON_CT:
            data = b'{"method":"x","' + key.encode() + b'":' + blowup + b'}'
        else:
            data = b'\x82\xa6method\xa1x' + _packb(key) + blowup
    else:
        data = prefix + blowup
    headers = {ROUTE_HEADER: [None, None, None]} if routed else None
    result = decode_both(hostname, None, data, content_type, 'utf-8',
                         headers, counter='blowups')
    assert_wire_safe(result)


@pytest.mark.parametrize('depth', [1_000, 10_000, 100_000])
@pytest.mark.parametrize('shape', [
    ('[', ']'), ('{"a":', '}'), ('[{"a":', '}]'), ('{"a":[', ']}'),
])
@pytest.mark.parametrize('key', ['arguments', 'destination', 'pattern'])
def test_nesting_beyond_the_recursion_limit(depth, shape, key):
    """Where Python's recursion limit cuts in must not show in the error."""
    opener, closer = shape
    text = ('{"method":"x","pattern":"*","matcher":"glob","' + key + '":' +
            opener * depth + closer * depth + '}')
    for body in (text, text.encode()):
        result = decode_both('w1', None, body, JSON_CT, 'utf-8', None,
                             counter='nesting')
        assert result[0] == 'raise' and result[1] is MalformedRequest
        routed = decode_both('w1', None, body, JSON_CT, 'utf-8',
                             {ROUTE_HEADER: [None, None, None]},
                             counter='nesting')
        assert routed[0] == 'raise' and routed[1] is MalformedRequest


@pytest.mark.parametrize('data', [
    b'\xdb\xff\xff\xff\xff', b'\x81\xa6method\xdb\xff\xff\xff\xff',
    b'\x81\xa6method\xdd\xff\xff\xff\xff', b'\x81\xa6method\xdf\xff\xff\xff\xff',
    b'\xdf\xff\xff\xff\xff', b'\xdd\xff\xff\xff\xff',
    b'\x81\xa6method\xc6\xff\xff\xff\xff', b'\x81\xa6method\xc9\xff\xff\xff\xff\x01',
    b'\x81\xa6method\xc1', b'\xc1', b'\x81\xa6method\xa1x\x00',
    b'\x82\xa6method\xa1x\xabdestination\xc1',
    b'\x82\xa6method\xa1x\xabdestination\x91\xa2w1\xc0',
    b'\x81\xc1\xa1x', b'\x80', b'\x90', b'',
])
@pytest.mark.parametrize('routed', [False, True])
def test_msgpack_edge_cases(data, routed):
    headers = {ROUTE_HEADER: [None, None, None]} if routed else None
    result = decode_both('w1', None, data, MSGPACK_CT, 'binary', headers,
                         counter='msgpack_edges')
    assert_wire_safe(result)


@pytest.mark.parametrize('text', [
    '{"method":"x","arguments":{"a":NaN}}',
    '{"method":"x","arguments":{"a":[Infinity,-Infinity]}}',
    '{"method":"x","destination":NaN}',
    '{"method":"x","destination":["w1"],"destination":["w2"]}',
    '{"method":"x","destination":["w2"],"destinatio\\u006e":["w1"]}',
    '{"method":"x","destination":["w1"],"destinatio\\u006e":["w2"]}',
    '{"method":"x","\\u0064estination":"w2"}',
    '{"method":"x","destination":"w"}',
    '{"method":"x","pattern":"w*","matcher":"glob","destination":[]}',
    '{"method":"x","pattern":"(","matcher":"pcre"}',
    '{"method":"x","pattern":"w.","matcher":"pcre"}',
    '{"method":"x","pattern":"w1","matcher":"nope"}',
    '{"method":"x","pattern":["w1"],"matcher":"glob"}',
    '{"method":"x","pattern":{"__type__":"uuid","__value__":"x"},'
    '"matcher":"glob"}',
    '{"method":"x","destination":{"__type__":"nope","__value__":1}}',
    '{"method":"x","arguments":{"__type__":"datetime",'
    '"__value__":"2020-01-01T00:00:00"}}',
    '{"method":"x","\\ud800":1}',
    '{"method":"x","\\":1}',
    '{"method":"x","a":tru}',
    '{"method":"x","destination":["w2"],"a":tru}',
    '{"method":"x"} ',
    '{"method":"x"}}',
    '{"method":"x"',
    '{"method":"x",}',
    '{,"method":"x"}',
    '{"method"  :  "x"  ,  "arguments"  :  { }  }',
    '\ufeff{"method":"x"}',
    '{"method":"\\u0000\\ud83d\\ude00"}',
    '[{"method":"x"}]',
    '"method"',
    '',
    '   ',
    '{}',
    '{"method":1}',
    '{"method":"x","arguments":[]}',
    '{"method":"x","arguments":{},"reply_to":{"exchange":"e"}}',
    '{"method":"x","reply_to":"r"}',
    '{"method":"x","reply_to":{"exchange":"e","routing_key":"k"},"ticket":1}',
])
@pytest.mark.parametrize('routed', [False, True])
@pytest.mark.parametrize('as_bytes', [False, True])
def test_json_edge_cases(text, routed, as_bytes):
    body = text.encode('utf-8', 'surrogatepass') if as_bytes else text
    headers = {ROUTE_HEADER: [None, None, None]} if routed else None
    result = decode_both('w1', None, body, JSON_CT, 'utf-8', headers,
                         counter='json_edges')
    assert_wire_safe(result)
    check_against_kombu('w1', None, body, JSON_CT, 'utf-8', headers, result)


@SETTINGS
@given(HOSTNAMES, ACCEPTS,
       st.one_of(st.none(), st.integers(), st.binary(max_size=8),
                 st.lists(st.integers(), max_size=3), unicode_text,
                 st.dictionaries(unicode_text, json_values, max_size=2)),
       st.one_of(CONTENT_TYPES, st.integers(), st.binary(max_size=20),
                 st.just(b'application/json')),
       st.one_of(ENCODINGS, st.integers(), st.binary(max_size=5)),
       st.one_of(st.none(), st.integers(), st.lists(st.integers()),
                 st.text(max_size=3), st.just({ROUTE_HEADER: None}),
                 st.dictionaries(st.sampled_from([ROUTE_HEADER, 1]),
                                 json_values, max_size=2)))
def test_wrong_types_everywhere(hostname, accept, body, content_type,
                                encoding, headers):
    """Non-wire values in every argument: still the same outcome."""
    decode_both(hostname, prepared(accept), body, content_type, encoding,
                headers, counter='wrong_types')


class StrSub(str):
    pass


class DictSub(dict):
    pass


class IterLies(dict):
    """A dict whose iteration hides its real keys."""

    def __iter__(self):
        return iter([1])


@pytest.mark.parametrize('hostname', ['w1', StrSub('w1'), None, 1, b'w1'])
def test_hostname_types(hostname):
    same(lambda core: core.Dispatcher(hostname, None).decode(
        b'{"method":"x","destination":["w1"]}', JSON_CT, 'utf-8', None),
        'odd_objects')


@pytest.mark.parametrize('make', [
    lambda: (StrSub('{"method":"x"}'), JSON_CT, None),
    lambda: (b'{"method":"x"}', StrSub(JSON_CT), None),
    lambda: (b'\x81\xa6method\xa1x', StrSub(MSGPACK_CT), None),
    lambda: (b'{"method":"x"}', JSON_CT, {ROUTE_HEADER: (None, None, None)}),
    lambda: (b'{"method":"x"}', JSON_CT, DictSub({ROUTE_HEADER: 'abc'})),
    lambda: (bytearray(b'{"method":"x"}'), JSON_CT, None),
    lambda: (memoryview(b'\x81\xa6method\xa1x'), MSGPACK_CT, None),
    lambda: (memoryview(b'xx{"method":"x"}')[2:], JSON_CT, None),
    lambda: ('{"method":"x"}', MSGPACK_CT, None),
    lambda: (b'', 'application/data', None),
    lambda: (b'{"method":"x"}', 'application/text', None),
])
def test_odd_objects(make):
    def run(core):
        body, ct, headers = make()
        return core.Dispatcher('w1', None).decode(body, ct, 'utf-8', headers)
    same(run, 'odd_objects')


# -- route, addressed, check_content_type ------------------------------------

hashables = st.one_of(st.none(), st.booleans(), st.integers(), FLOATS,
                      any_text, st.binary(max_size=4),
                      st.tuples(st.integers(), any_text))
py_values = st.recursive(
    st.one_of(hashables, st.just(float('nan'))),
    lambda kids: st.one_of(
        st.lists(kids, max_size=4), st.tuples(kids, kids),
        st.dictionaries(hashables, kids, max_size=4),
        st.dictionaries(any_text, kids, max_size=4),
        st.frozensets(hashables, max_size=3),
        st.dictionaries(any_text, kids, max_size=3).map(DictSub),
        st.dictionaries(any_text, kids, max_size=3).map(IterLies)),
    max_leaves=10)


@st.composite
def py_bodies(draw):
    hostname = draw(HOSTNAMES)
    kind = draw(st.integers(0, 5))
    if kind == 0:
        body = draw(py_values)
    else:
        body = draw(requests(hostname, values=py_values))
        if kind == 1:
            body = DictSub(body)
        elif kind == 2:
            body[draw(hashables)] = draw(py_values)
    return hostname, body


@settings(SETTINGS, max_examples=examples(600))
@given(py_bodies())
def test_route_on_python_values(hb):
    hostname, body = hb
    result = same(lambda core: core.Dispatcher(hostname, None).route(body),
                  'route')
    if isinstance(body, dict) and type(body) in (dict, DictSub):
        try:
            wanted = kombu_addressed(hostname, body)
        except Exception:
            return
        if wanted:
            assert result == outcome(lambda: P.validate(body)), result
        else:
            assert result == ('ok', type(None), 'None'), result


@settings(SETTINGS, max_examples=examples(600))
@given(HOSTNAMES, st.data())
def test_addressed_on_python_values(hostname, data):
    destination = data.draw(st.one_of(destinations(hostname), py_values))
    pattern = data.draw(st.one_of(patterns(hostname), py_values))
    matcher = data.draw(st.one_of(MATCHERS, py_values))
    result = same(lambda core: core.Dispatcher(hostname, None).addressed(
        destination, pattern, matcher), 'addressed')
    body = {'destination': destination, 'pattern': pattern,
            'matcher': matcher}
    try:
        wanted = kombu_addressed(hostname, body)
    except Exception:
        return
    assert result == ('ok', bool, repr(wanted))


# The compiled core matches globs of '*', '?' and text itself (a wildcard
# walk over code points); these make patterns and names from a small
# alphabet so that most pairs nearly match, and compare with fnmatch.
GLOB_CHARS = 'ab*?.\n\u00e9\U0001f600'
GLOB_NAMES = st.text(alphabet='ab.\n\u00e9\U0001f600', max_size=10)
GLOB_PATTERNS = st.text(alphabet=GLOB_CHARS, max_size=8)


@settings(SETTINGS, max_examples=examples(2000))
@given(GLOB_NAMES, GLOB_PATTERNS)
def test_glob_matching_is_fnmatch(hostname, pattern):
    result = same(lambda core: core.Dispatcher(hostname, None).addressed(
        None, pattern, 'glob'), 'glob')
    # an empty pattern addresses every node (kombu's rule)
    wanted = fnmatch.fnmatch(hostname, pattern) if pattern else True
    assert result == ('ok', bool, repr(wanted)), (hostname, pattern)


@pytest.mark.parametrize('hostname,pattern,wanted', [
    ('worker-7@host', 'worker-*@host', True),
    ('worker-7@host', 'worker-?@host', True),
    ('worker-17@host', 'worker-?@host', False),
    ('abcabd', '*abd', True),           # backs up to the star
    ('aaaaaaaaaaaaaaaaaaab', '*a*a*a*a*a*a*b', True),
    ('aaaaaaaaaaaaaaaaaaaa', '*a*a*a*a*a*a*b', False),
    ('a\nb', 'a?b', True),              # '?' is DOTALL's '.'
    ('a\nb', 'a*', True),
    ('', '*', True),
    ('x', '**', True),
    ('ab', 'a', False),                 # anchored at the end
    ('ab', 'b', False),                 # and at the start
    ('w1', 'w[0-9]', True),             # a class: fnmatch's regex
    ('w1', 'w[!0-9]', False),
    ('w.1', 'w.?', True),               # '.' is a character, not a regex
    ('w+1', 'w+1', True),
    ('\u00e9t\u00e9', '\u00e9*', True),
    ('x\U0001f600y', 'x?y', True),
])
def test_glob_examples(core, hostname, pattern, wanted):
    assert fnmatch.fnmatch(hostname, pattern) is wanted
    assert core.Dispatcher(hostname, None).addressed(
        None, pattern, 'glob') is wanted


class EqAlways(str):
    """A str subclass that claims equality with everything."""

    def __eq__(self, other):
        return True

    __hash__ = str.__hash__


class EqNever(str):
    """A str subclass equal to nothing, not even the same text."""

    def __eq__(self, other):
        return False

    __hash__ = str.__hash__


class EqRaises:
    def __eq__(self, other):
        raise ValueError('no comparing me')


class EqShrinks:
    """Empties the destination list it sits in when compared."""

    def __init__(self, names):
        self.names = names

    def __eq__(self, other):
        del self.names[:]
        return False


def _shrinking(hostname):
    names = ['a', 'b']
    names[1:1] = [EqShrinks(names)]
    names.append(hostname)
    return names


ODD_DESTINATIONS = {
    'equal text, other object': lambda h: ['x', ''.join(list(h))],
    'non-ascii names': lambda h: ['\u00e9t\u00e9', 'w\u2603', h + '\U0001f600'],
    'same length, other text': lambda h: [h[:-1] + '#', h[::-1]],
    'prefix and suffix': lambda h: [h[:-1], h + 'x', 'x' + h],
    'tuple': lambda h: ('x', h),
    'subclass claims equal': lambda h: [EqAlways('nobody')],
    'subclass denies equal': lambda h: [EqNever(h)],
    'item whose __eq__ raises': lambda h: ['x', EqRaises(), h],
    'item that empties the list': _shrinking,
    'ints and None': lambda h: [1, None, 2.5, h],
    'bytes of the name': lambda h: [h.encode()],
    'list subclass': lambda h: type('L', (list,), {})(['x', h]),
    'str destination': lambda h: 'x' + h + 'x',
}


@pytest.mark.parametrize('hostname', ['w1', 'worker-7@host.example.com',
                                      '\u00e9t\u00e9', 'w\U0001f600'])
@pytest.mark.parametrize('name', sorted(ODD_DESTINATIONS))
def test_addressed_on_odd_destinations(hostname, name):
    """The compiled destination scan answers as ``hostname in destination``."""
    def run(core):
        return core.Dispatcher(hostname, None).addressed(
            ODD_DESTINATIONS[name](hostname), None, None)
    result = same(run, 'addressed')
    wanted = outcome(lambda: kombu_addressed(
        hostname, {'destination': ODD_DESTINATIONS[name](hostname)}))
    if wanted[0] == 'ok':
        assert result == wanted
    else:   # kombu's error surfaces unchanged or as MalformedRequest
        assert result[0] == 'raise'


@SETTINGS
@given(ACCEPTS, st.one_of(CONTENT_TYPES, py_values,
                          st.builds(StrSub, st.sampled_from([
                              JSON_CT, 'application/x-yaml']))))
def test_check_content_type(accept, content_type):
    same(lambda core: core.Dispatcher('w1', prepared(accept))
         .check_content_type(content_type), 'check_content_type')


@settings(SETTINGS, max_examples=examples(600))
@given(py_values)
def test_validate_on_python_values(value):
    same(lambda core: core.validate(value), 'validate')


# -- execute -----------------------------------------------------------------

class Boom(Exception):
    pass


def _h_echo(state, **kwargs):
    return {'state': state, 'kwargs': kwargs}


def _h_fixed(state, a, b=2):
    return [state, a, b]


def _h_raise(state, **kwargs):
    raise Boom(sorted(kwargs, key=repr))


def _h_keyerror(state, **kwargs):
    return {}['missing']


def _h_exit(state, **kwargs):
    raise SystemExit(3)


def _h_mutates(state, **kwargs):
    kwargs['added'] = 1
    return len(kwargs)


HANDLER_TABLES = st.sampled_from([
    {'ping': _h_echo, 'fixed': _h_fixed, 'raise': _h_raise,
     'keyerror': _h_keyerror, 'exit': _h_exit, 'mutates': _h_mutates,
     '__class__': _h_echo, 'a.b.c': _h_fixed, 'notcallable': 5},
    {},
    collections.OrderedDict(ping=_h_echo),
    collections.defaultdict(lambda: _h_echo),
])
EXEC_METHODS = st.one_of(
    st.sampled_from(['ping', 'fixed', 'raise', 'keyerror', 'exit', 'mutates',
                     '__class__', 'a.b.c', 'notcallable', 'missing', '',
                     'handlers']),
    unicode_text, st.integers(), st.none(), st.tuples(st.integers()))
EXEC_ARGS = st.one_of(
    st.none(), st.just({}),
    st.dictionaries(st.sampled_from(['a', 'b', 'c', 'state', '1a', 'a-b', '',
                                     'class']), json_values, max_size=3),
    st.dictionaries(hashables, json_values, max_size=2),
    st.dictionaries(st.sampled_from(['a', 'b']), json_values,
                    max_size=2).map(DictSub),
    st.lists(st.tuples(st.sampled_from(['a', 'b']), st.integers()),
             max_size=2),
    st.lists(st.integers(), max_size=2), st.text(max_size=3),
    st.integers(), st.just(()), st.just(0), st.just(''))


@settings(SETTINGS, max_examples=examples(600))
@given(HANDLER_TABLES, st.one_of(st.none(), st.integers(), unicode_text),
       EXEC_METHODS, EXEC_ARGS)
def test_execute_the_same(handlers, state, method, arguments):
    def run(core):
        try:
            return core.execute(handlers, state, method, arguments)
        except SystemExit as exc:  # must come through, in both
            return ('SystemExit', exc.code)
    same(run, 'execute')


# -- the compiled core is compiled -------------------------------------------

def test_compiled_core_is_a_compiled_module():
    if C is None:
        pytest.skip('compiled core not loaded')
    assert C.__file__.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))
    assert C.__name__ == 'pidbox._dispatch' and C is not P
    assert isinstance(C.__loader__, importlib.machinery.ExtensionFileLoader)
    for name in ('validate', 'execute'):
        assert not inspect.isfunction(getattr(C, name)), name
        assert inspect.isfunction(getattr(P, name)), name
    # a cdef class: no instance __dict__, unlike the pure twin's class
    assert not hasattr(C.Dispatcher('w1', None), '__dict__')
    assert hasattr(P.Dispatcher('w1', None), '__dict__')


@pytest.mark.parametrize('encoding', ['utf-8', 'binary', None, 'latin-1',
                                      'ascii', 'utf-16', 'nope', 'UTF-8'])
@pytest.mark.parametrize('shape', [bytes, bytearray, memoryview, str])
def test_json_decodes_like_kombu_whatever_the_encoding(encoding, shape):
    """kombu's JSON decoder reads bytes as UTF-8 and ignores the encoding."""
    text = '{"method":"\u00e9\u4e2d","arguments":{"k\u00fc":"\U0001f600"}}'
    body = text if shape is str else shape(text.encode('utf-8'))
    result = decode_both('w1', None, body, JSON_CT, encoding, None,
                         counter='encodings')
    check_against_kombu('w1', None, body, JSON_CT, encoding, None, result)
    assert result[0] == 'ok'


def test_nesting_near_the_recursion_limit():
    # both cores refuse JSON deeper than MAX_JSON_DEPTH before decoding it
    for depth in range(MAX_JSON_DEPTH - 10, 1100):
        text = ('{"method":"x","arguments":{"a":' + '[' * depth +
                ']' * depth + '}}')
        decode_both('w1', None, text, JSON_CT, 'utf-8', None,
                    counter='nesting')
    for core in (_core.pure, _core.compiled):
        if core is None:
            continue
        dispatcher = core.Dispatcher('w1', None)
        deep = '[' * (MAX_JSON_DEPTH - 2) + ']' * (MAX_JSON_DEPTH - 2)
        ok = '{"method":"x","arguments":{"a":' + deep + '}}'
        assert dispatcher.decode(ok, JSON_CT, 'utf-8', {})['method'] == 'x'
        too_deep = ok.replace(deep, '[' + deep + ']')
        with pytest.raises(MalformedRequest, match='nested deeper'):
            dispatcher.decode(too_deep, JSON_CT, 'utf-8', {})


# -- the payload filter (RawHandler.drop) ------------------------------------

class StubConsumer:
    def __init__(self, no_ack=True):
        self.callbacks = [object()]
        self.no_ack = no_ack
        self.on_message = None


class StubNode:
    def __init__(self, hostname):
        self.hostname = hostname
        self.clock = LamportClock(initial_value=7)
        self.adjust_clock = self.clock.adjust


DROPPED = collections.Counter()


@st.composite
def payloads(draw, hostname):
    """What a virtual transport hands the filter, mostly well formed."""
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(py_values)
    headers = {}
    if draw(st.booleans()):
        headers['clock'] = draw(st.one_of(st.integers(-5, 10 ** 20),
                                          py_values))
    if kind == 1:
        headers[ROUTE_HEADER] = draw(py_values)
    elif kind >= 6:   # likely for another node
        route = draw(st.sampled_from([
            [['x', hostname + 'x', hostname[:-1]], '', ''],
            [None, hostname + '?*', 'glob'], [[], 'x.*', 'pcre'],
            [['x'], hostname, 'glob'], [[hostname], '', '']]))
        headers[ROUTE_HEADER] = route
    elif kind != 2:
        route = [draw(destinations(hostname)), draw(patterns(hostname)),
                 draw(MATCHERS)]
        headers[ROUTE_HEADER] = (tuple(route) if kind == 3 else route)
    if kind == 4:
        headers['compression'] = 'application/x-gzip'
    payload = {'body': 'e30=', 'properties': {'body_encoding': 'base64'},
               'content-encoding': 'utf-8',
               'content-type': (draw(st.one_of(CONTENT_TYPES, py_values))
                                if kind < 6 else 'application/json'),
               'headers': headers if kind != 5 else draw(py_values)}
    return payload


@settings(SETTINGS, max_examples=examples(600))
@given(HOSTNAMES, ACCEPTS, st.booleans(), st.data())
def test_payload_filter(hostname, accept, no_ack, data):
    payload = data.draw(payloads(hostname))

    def drop(core):
        node = StubNode(hostname)
        consumer = StubConsumer(no_ack)
        handler = core.RawHandler(node, core.Dispatcher(
            hostname, prepared(accept)), consumer)
        consumer.on_message = handler
        return handler.drop(payload), node.clock.value
    result = same(drop, 'drop')
    assert result[0] == 'ok'
    dropped, clock = eval(result[2])   # noqa: S307 - a (bool, int) repr
    DROPPED[dropped] += 1
    if dropped:   # only a route header that leaves this node out drops
        route = payload['headers'][ROUTE_HEADER]
        assert no_ack and 'compression' not in payload['headers']
        assert not kombu_addressed(hostname, {
            'destination': route[0], 'pattern': route[1],
            'matcher': route[2]})
        assert clock > 7
    else:
        assert clock == 7


def test_payload_filter_dropped_some_and_kept_some():
    """The generated payloads exercise both answers (runs after the above)."""
    if not DROPPED:
        pytest.skip('test_payload_filter did not run in this session')
    assert DROPPED[True] >= 10 and DROPPED[False] >= 10, DROPPED
