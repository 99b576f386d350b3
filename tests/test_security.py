"""Content-type safety: accept lists at the node and at the caller, signing.

Runs on kombu's ``memory://`` transport, on both dispatch cores.  A node
must refuse what its accept list does not name (and pickle/YAML unless named
explicitly), hand the refusal to ``on_decode_error`` and keep serving; a
caller must refuse a reply it does not accept (kombu's ``ContentDisallowed``
for its own ticket, a dropped reply and a warning for another ticket).
Celery's ``auth`` serializer is exercised with a real self-signed RSA
certificate made here with ``cryptography``.
"""

from __future__ import annotations

import base64
import datetime
import logging
import pickle
import uuid

import pytest
from kombu import Connection
from kombu.exceptions import ContentDisallowed
from kombu.serialization import (
    enable_insecure_serializers, prepare_accept_content, registry,
)

import pidbox
from memory_nodes import publish_raw, serve

pytestmark = pytest.mark.usefixtures('core')

PICKLE_CT = 'application/x-python-serialize'
YAML_CT = 'application/x-yaml'


# -- helpers ------------------------------------------------------------------

def unique(prefix):
    return f'{prefix}-{uuid.uuid4().hex[:10]}'


@pytest.fixture
def conn():
    c = Connection('memory://', transport_options={'polling_interval': 0.01})
    try:
        yield c
    finally:
        c.release()


@pytest.fixture
def namespace():
    return unique('sec')


class Recorder:
    """An ``on_decode_error`` that records and never raises."""

    def __init__(self):
        self.errors = []

    def __call__(self, message, exc):
        self.errors.append((message.content_type, exc))


def start_node(bound, hostname, handlers=None, recorder=None):
    node = bound.Node(hostname, state={'hostname': hostname},
                      channel=bound.connection.channel(),
                      handlers=dict(handlers or {
                          'ping': lambda state: 'pong',
                          'echo': lambda state, value=None: value,
                      }))
    if recorder is not None:
        node.on_decode_error = recorder
    consumer = node.listen()
    return node, consumer


def request(method, **arguments):
    return {'method': method, 'arguments': arguments, 'destination': None,
            'pattern': None, 'matcher': None}


@pytest.fixture
def insecure_enabled():
    """kombu's registry with pickle (and yaml) *enabled* for decoding.

    pidbox must refuse them anyway when the node's accept list is None.
    """
    saved = set(registry._disabled_content_types)
    enable_insecure_serializers()
    try:
        yield
    finally:
        registry._disabled_content_types.clear()
        registry._disabled_content_types.update(saved)


# -- requests at the node ---------------------------------------------------

def test_node_refuses_pickle_and_yaml_requests_by_default(conn, namespace,
                                                          caplog):
    bound = pidbox.Mailbox(namespace, type='fanout')(conn)
    assert bound.accept == ['json']
    ran = []
    recorder = Recorder()
    start_node(bound, 'a', {'boom': lambda state: ran.append('pickle ran'),
                            'ping': lambda state: 'pong'}, recorder)
    publish_raw(bound, pickle.dumps(request('boom')), PICKLE_CT, 'binary')
    publish_raw(bound, b'method: boom\narguments: {}\n', YAML_CT, 'utf-8')
    serve(conn)
    assert ran == []
    assert [ct for ct, _ in recorder.errors] == [PICKLE_CT, YAML_CT]
    assert all(isinstance(exc, ContentDisallowed)
               for _, exc in recorder.errors)
    # still serving
    assert bound.call(['a'], 'ping', timeout=5) == [{'a': 'pong'}]


def test_default_on_decode_error_logs_the_refusal(conn, namespace, caplog):
    bound = pidbox.Mailbox(namespace, type='fanout')(conn)
    ran = []
    start_node(bound, 'a', {'boom': lambda state: ran.append(1),
                            'ping': lambda state: 'pong'})
    with caplog.at_level(logging.ERROR):
        publish_raw(bound, pickle.dumps(request('boom')), PICKLE_CT,
                    'binary')
        serve(conn)
    assert ran == []
    assert any('decode' in r.getMessage().lower() or
               'refus' in r.getMessage().lower() for r in caplog.records), \
        [r.getMessage() for r in caplog.records]
    assert bound.call(['a'], 'ping', timeout=5) == [{'a': 'pong'}]


def test_node_with_no_accept_list_refuses_pickle_and_yaml(
        conn, namespace, insecure_enabled):
    """accept=None: kombu would decode pickle if the registry allows it."""
    bound = pidbox.Mailbox(namespace, type='fanout')(conn)
    bound.accept = None            # no accept list on the node side at all
    ran = []
    recorder = Recorder()
    node, consumer = start_node(
        bound, 'a', {'boom': lambda state: ran.append(1),
                     'ping': lambda state: 'pong'}, recorder)
    assert consumer.accept is None
    publish_raw(bound, pickle.dumps(request('boom')), PICKLE_CT, 'binary')
    publish_raw(bound, b'method: boom\n', YAML_CT, 'utf-8')
    serve(conn)
    assert ran == []
    assert [ct for ct, _ in recorder.errors] == [PICKLE_CT, YAML_CT]
    assert all(isinstance(exc, ContentDisallowed)
               for _, exc in recorder.errors)
    # json still runs, and the node still answers
    publish_raw(bound, b'{"method": "boom", "arguments": {}}',
                'application/json', 'utf-8')
    serve(conn)
    assert ran == [1]
    assert bound.call(['a'], 'ping', timeout=5) == [{'a': 'pong'}]


def test_dispatcher_without_accept_list_refuses_insecure_types(core):
    dispatcher = core.Dispatcher('a', None)
    for content_type in (PICKLE_CT, YAML_CT):
        with pytest.raises(ContentDisallowed):
            dispatcher.decode(pickle.dumps(request('x')), content_type,
                              'binary', {})
    assert dispatcher.decode(b'{"method": "x"}', 'application/json',
                             'utf-8', {})['method'] == 'x'


def test_pickle_runs_when_named_explicitly(conn, namespace):
    accept = ['json', 'pickle']
    bound = pidbox.Mailbox(namespace, type='fanout', accept=accept)(conn)
    ran = []
    recorder = Recorder()
    start_node(bound, 'a', {'note': lambda state, value: ran.append(value)},
               recorder)
    publish_raw(bound, pickle.dumps(request('note', value=(1, 2))),
                PICKLE_CT, 'binary')
    serve(conn)
    assert ran == [(1, 2)]          # a tuple: it really came through pickle
    assert recorder.errors == []


def test_node_refuses_json_when_accept_names_only_msgpack(conn, namespace):
    bound = pidbox.Mailbox(namespace, type='fanout', serializer='msgpack',
                           accept=['msgpack'])(conn)
    recorder = Recorder()
    ran = []
    start_node(bound, 'a', {'note': lambda state: ran.append(1),
                            'ping': lambda state: 'pong'}, recorder)
    publish_raw(bound, b'{"method": "note", "arguments": {}}',
                'application/json', 'utf-8')
    serve(conn)
    assert ran == []
    assert [ct for ct, _ in recorder.errors] == ['application/json']
    assert bound.call(['a'], 'ping', timeout=5) == [{'a': 'pong'}]


def test_celery_style_callback_node_refuses_pickle(conn, namespace, caplog):
    """listen(callback=...): kombu decodes, with the mailbox's accept list."""
    bound = pidbox.Mailbox(namespace, type='fanout')(conn)
    node = bound.Node('a', handlers={'boom': lambda state: 1 / 0,
                                     'ping': lambda state: 'pong'},
                      channel=conn.channel())
    recorder = Recorder()
    ran = []
    consumer = node.listen(
        callback=lambda body, message: ran.append(body) or
        node.handle_message(body, message))
    consumer.on_decode_error = recorder
    publish_raw(bound, pickle.dumps(request('boom')), PICKLE_CT, 'binary')
    serve(conn)
    assert ran == []
    assert [ct for ct, _ in recorder.errors] == [PICKLE_CT]
    assert bound.call(['a'], 'ping', timeout=5) == [{'a': 'pong'}]


# -- replies at the caller --------------------------------------------------

def test_pickle_reply_for_own_ticket_raises_content_disallowed(conn,
                                                               namespace):
    # the node accepts json requests but answers in pickle
    node_box = pidbox.Mailbox(namespace, type='fanout', serializer='pickle',
                              accept=['json'])(conn)
    start_node(node_box, 'evil')
    client = pidbox.Mailbox(namespace, type='fanout')(conn)
    with pytest.raises(ContentDisallowed):
        client.call(['evil'], 'ping', timeout=5)


def test_kombu_raises_the_same_for_a_pickle_reply(conn, namespace):
    """The reference behaviour the previous test matches."""
    from kombu.pidbox import Mailbox as KombuMailbox
    node_box = pidbox.Mailbox(namespace, type='fanout', serializer='pickle',
                              accept=['json'])(conn)
    start_node(node_box, 'evil')
    client = KombuMailbox(namespace, type='fanout')(conn)
    # kombu's limit counts drained events (the node's own delivery on this
    # shared connection is one): collect without a limit instead
    with pytest.raises(ContentDisallowed):
        client.multi_call('ping', timeout=2)


def test_pickle_reply_for_another_ticket_is_dropped_with_a_warning(
        conn, namespace, caplog):
    client = pidbox.Mailbox(namespace, type='fanout')(conn)
    start_node(client, 'good')
    assert client.call(['good'], 'ping', timeout=5) == [{'good': 'pong'}]
    # a stranger publishes a pickle reply to the caller's reply queue
    stranger = pidbox.Mailbox(namespace, type='fanout')(conn)
    with caplog.at_level(logging.WARNING, logger='pidbox'):
        stranger._publish_reply({'x': 'evil'}, client.reply_exchange.name,
                                client.oid, 'someone-else',
                                serializer='pickle')
        stranger._publish_reply({'x': 'fine'}, client.reply_exchange.name,
                                client.oid, 'someone-json')
        assert client.call(['good'], 'echo', {'value': 7}, timeout=5) == [
            {'good': 7}]
    assert 'someone-else' not in client.unclaimed
    assert list(client.unclaimed.pop('someone-json')) == [{'x': 'fine'}]
    assert any('dropped reply' in r.getMessage() and 'someone-else' in
               r.getMessage() for r in caplog.records), \
        [r.getMessage() for r in caplog.records]


def test_pickle_reply_accepted_when_caller_names_pickle(conn, namespace):
    node_box = pidbox.Mailbox(namespace, type='fanout', serializer='pickle',
                              accept=['json'])(conn)
    start_node(node_box, 'a', {'pair': lambda state: (1, 2)})
    client = pidbox.Mailbox(namespace, type='fanout',
                            accept=['json', 'pickle'])(conn)
    assert client.call(['a'], 'pair', timeout=5) == [{'a': (1, 2)}]


# -- a serializer registered with kombu -------------------------------------

ROT_CT = 'application/x-pidbox-rot13-json'


@pytest.fixture
def rot13_serializer():
    import codecs
    import json

    def encode(data):
        return codecs.encode(json.dumps(data), 'rot13')

    def decode(data):
        if isinstance(data, (bytes, bytearray, memoryview)):
            data = bytes(data).decode('utf-8')
        return json.loads(codecs.decode(data, 'rot13'))

    registry.register('rot13json', encode, decode, content_type=ROT_CT,
                      content_encoding='utf-8')
    try:
        yield 'rot13json'
    finally:
        registry.unregister('rot13json')


def test_registered_custom_serializer_works_end_to_end(conn, namespace,
                                                       rot13_serializer):
    bound = pidbox.Mailbox(namespace, type='fanout',
                           serializer=rot13_serializer,
                           accept=[rot13_serializer])(conn)
    recorder = Recorder()
    start_node(bound, 'a', recorder=recorder)
    start_node(bound, 'b', recorder=recorder)
    assert bound.call(['a'], 'echo', {'value': 'secret'}, timeout=5) == [
        {'a': 'secret'}]
    replies = bound.multi_call('echo', {'value': [1, 'x']}, timeout=5,
                               limit=2)
    assert sorted(replies, key=lambda r: list(r)) == [
        {'a': [1, 'x']}, {'b': [1, 'x']}]
    # glob routing through the slow path
    assert bound._broadcast('echo', {'value': 3}, reply=True, timeout=5,
                            limit=1, pattern='b*', matcher='glob') == [
        {'b': 3}]
    assert recorder.errors == []
    # the wire really carried the custom type
    dispatcher_accept = prepare_accept_content([rot13_serializer])
    assert dispatcher_accept == {ROT_CT}


def test_custom_serializer_refused_when_not_accepted(conn, namespace,
                                                     rot13_serializer):
    node_box = pidbox.Mailbox(namespace, type='fanout')(conn)  # json only
    recorder = Recorder()
    ran = []
    start_node(node_box, 'a', {'note': lambda state: ran.append(1),
                               'ping': lambda state: 'pong'}, recorder)
    sender = pidbox.Mailbox(namespace, type='fanout',
                            serializer=rot13_serializer)(conn)
    sender.cast(None, 'note')
    serve(conn)
    assert ran == []
    assert [ct for ct, _ in recorder.errors] == [ROT_CT]
    assert node_box.call(['a'], 'ping', timeout=5) == [{'a': 'pong'}]


# -- Celery's signing serializer ('auth') -----------------------------------

def _self_signed(common_name, tmp_path, stem):
    """Write a fresh RSA key and self-signed certificate; return the paths."""
    x509 = pytest.importorskip('cryptography.x509')
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    key_path = tmp_path / f'{stem}.key'
    cert_path = tmp_path / f'{stem}.pem'
    key_path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


@pytest.fixture
def signing(tmp_path):
    """Celery's ``auth`` serializer set up with ``app.setup_security()``.

    setup_security changes kombu's global registry (disables serializers,
    sets the default): everything is restored afterwards.
    """
    pytest.importorskip('cryptography')
    from celery import Celery

    key_path, cert_path = _self_signed('pidbox-test', tmp_path, 'signer')
    store = tmp_path / 'store'
    store.mkdir()
    (store / 'signer.pem').write_bytes(cert_path.read_bytes())

    saved = (set(registry._disabled_content_types), registry._default_encode,
             registry._default_content_type,
             registry._default_content_encoding)
    app = Celery('pidbox-security-test', set_as_current=False)
    app.conf.update(
        security_key=str(key_path), security_certificate=str(cert_path),
        security_cert_store=str(store), security_digest='sha256',
        security_serializer='json', task_serializer='auth',
        event_serializer='auth', accept_content=['auth'],
        result_accept_content=['auth'])
    try:
        app.setup_security()
        yield {'app': app, 'key': key_path, 'cert': cert_path,
               'store': store, 'tmp': tmp_path}
    finally:
        registry.unregister('auth')
        registry._disabled_content_types.clear()
        registry._disabled_content_types.update(saved[0])
        (registry._default_encode, registry._default_content_type,
         registry._default_content_encoding) = saved[1:]
        app.close()


def _repack(signed, **changes):
    """Take apart an ``auth`` payload, change fields, pack it again."""
    from celery.security.serialization import DEFAULT_SEPARATOR
    raw = base64.b64decode(signed)
    parts = raw.split(DEFAULT_SEPARATOR, 4)
    for index, value in changes.items():
        parts[int(index[1:])] = value
    return base64.b64encode(DEFAULT_SEPARATOR.join(parts))


def test_auth_signed_request_runs_and_unsigned_or_tampered_ones_do_not(
        conn, namespace, signing, caplog):
    bound = pidbox.Mailbox(namespace, type='fanout', serializer='auth',
                           accept=['auth'])(conn)
    recorder = Recorder()
    ran = []
    start_node(bound, 'a', {'note': lambda state, value: ran.append(value),
                            'echo': lambda state, value=None: value},
               recorder)

    # signed request, signed reply, verified on both ends
    assert bound.call(['a'], 'echo', {'value': 'signed'}, timeout=10) == [
        {'a': 'signed'}]
    bound.cast(['a'], 'note', {'value': 'signed cast'})
    serve(conn)
    assert ran == ['signed cast']
    assert recorder.errors == []

    # 1. unsigned JSON: refused by the accept list
    publish_raw(bound, b'{"method": "note", "arguments": {"value": "json"}}',
                'application/json', 'utf-8')
    # 2. a signed body whose payload was changed after signing
    content_type, encoding, signed = registry.dumps(
        request('note', value='original'), serializer='auth')
    assert content_type == 'application/data'
    tampered = _repack(signed, f4=b'{"method": "note", "arguments": '
                                  b'{"value": "tampered"}}')
    publish_raw(bound, tampered, content_type, encoding)
    # 3. plain JSON claiming to be 'auth' content (no signature at all)
    publish_raw(bound, base64.b64encode(b'{"method": "note"}'),
                content_type, encoding)
    # 4. signed by a key whose certificate is not in the store
    from celery.security.serialization import SecureSerializer
    from celery.security.certificate import Certificate
    from celery.security.key import PrivateKey
    rogue_key, rogue_cert = _self_signed('rogue', signing['tmp'], 'rogue')
    rogue = SecureSerializer(PrivateKey(rogue_key.read_text()),
                             Certificate(rogue_cert.read_text()), None,
                             'sha256', serializer='json')
    publish_raw(bound, rogue.serialize(request('note', value='rogue')),
                content_type, encoding)
    serve(conn, 0.5)

    assert ran == ['signed cast'], ran
    assert len(recorder.errors) == 4, recorder.errors
    assert isinstance(recorder.errors[0][1], ContentDisallowed)
    # the node keeps serving signed requests afterwards
    assert bound.call(['a'], 'echo', {'value': 'again'}, timeout=10) == [
        {'a': 'again'}]
    bound.cast(['a'], 'note', {'value': 'after'})
    serve(conn)
    assert ran == ['signed cast', 'after']


def test_auth_node_logs_the_rejection_with_default_on_decode_error(
        conn, namespace, signing, caplog):
    bound = pidbox.Mailbox(namespace, type='fanout', serializer='auth',
                           accept=['auth'])(conn)
    ran = []
    start_node(bound, 'a', {'note': lambda state, value: ran.append(value),
                            'echo': lambda state, value=None: value})
    content_type, encoding, signed = registry.dumps(
        request('note', value='x'), serializer='auth')
    tampered = _repack(signed, f4=b'{"method": "note", "arguments": '
                                  b'{"value": "evil"}}')
    with caplog.at_level(logging.ERROR):
        publish_raw(bound, tampered, content_type, encoding)
        serve(conn)
    assert ran == []
    assert any('decode' in r.getMessage().lower() for r in caplog.records), \
        [r.getMessage() for r in caplog.records]
    assert bound.call(['a'], 'echo', {'value': 1}, timeout=10) == [{'a': 1}]


def test_unsigned_reply_to_a_signing_caller_is_refused(conn, namespace,
                                                       signing):
    """A node that answers in plain JSON cannot fool an ``auth`` caller."""
    node_box = pidbox.Mailbox(namespace, type='fanout', serializer='json',
                              accept=['auth'])(conn)
    start_node(node_box, 'plain')
    client = pidbox.Mailbox(namespace, type='fanout', serializer='auth',
                            accept=['auth'])(conn)
    with pytest.raises(ContentDisallowed):
        client.call(['plain'], 'ping', timeout=5)
