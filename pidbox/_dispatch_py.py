"""Pure-Python twin of the compiled dispatch core (``src/_dispatch.pyx``).

Both modules implement the same algorithm, statement for statement, and the
test-suite feeds them the same random messages to prove it.  Change one, change
the other.

The algorithm, for a raw request:

1. refuse content types outside the accept list (pickle and YAML are refused
   when no accept list was given);
2. decide whether this node is addressed, from the ``pidbox-route`` header when
   a pidbox client sent one, else by *skimming* the body: the JSON text or the
   msgpack map is walked without building objects, and only the values of
   ``destination``, ``pattern`` and ``matcher`` are decoded;
3. only when addressed, decode the whole body with kombu's registered decoder
   and check the shape of the request.

A message that is not for this node is dropped after step 2; what lies in its
skipped values is never validated.
"""

from __future__ import annotations

import json
import logging
import re
from fnmatch import fnmatch, translate

from kombu import matcher as _matchers

from ._codec import (  # the skim shares the depth check's regexes
    _STRING_TAIL, _STRUCTURE, GLOB_AS_IS, JSON_CT, MSGPACK_CT,
    MSGPACK_DECODER, decode_span, error_reply,
    generic_match, json_text, kombu_json_loads, load, native_json,
    native_msgpack, short,
)
from .exceptions import (
    INSECURE_CONTENT, ROUTE_HEADER, TRUSTED_CONTENT, ContentDisallowed,
    DecodeError, MalformedRequest,
)

__all__ = ('Dispatcher', 'RawHandler', 'PayloadFilter', 'validate', 'execute',
           'run')

logger = logging.getLogger('pidbox.dispatch')

_PCRE = re.match
_CACHE_SIZE = 256
_glob_cache: dict = {}
_pcre_cache: dict = {}

_SCALAR = re.compile(r'[^,}\] \t\n\r]*')
_WS = re.compile(r'[ \t\n\r]*')


def _compiled(cache: dict, pattern: str, source: str):
    if len(cache) >= _CACHE_SIZE:
        cache.clear()
    rx = cache[pattern] = re.compile(source)
    return rx


# -- JSON skimming ---------------------------------------------------------

def _json_error(what: str, pos: int) -> MalformedRequest:
    return MalformedRequest('body', f'invalid JSON: {what} at offset {pos}')


def _json_string_end(s: str, pos: int) -> int:
    m = _STRING_TAIL.match(s, pos + 1)
    if m is None:
        raise _json_error('unterminated string', pos)
    return m.end()


def _json_value_end(s: str, pos: int, n: int) -> int:
    if pos >= n:
        raise _json_error('expected a value', pos)
    c = s[pos]
    if c == '"':
        return _json_string_end(s, pos)
    if c == '[' or c == '{':
        start = pos
        depth = 1
        pos += 1
        while True:
            m = _STRUCTURE.search(s, pos)
            if m is None:
                raise _json_error('unterminated array or object', start)
            i = m.start()
            c = s[i]
            if c == '"':
                pos = _json_string_end(s, i)
            elif c == '[' or c == '{':
                depth += 1
                pos = i + 1
            else:
                depth -= 1
                pos = i + 1
                if depth == 0:
                    return pos
    end = _SCALAR.match(s, pos).end()
    if end == pos:
        raise _json_error('expected a value', pos)
    return end


def _skim_json(s: str) -> dict:
    """Map each routing key to the (start, end) span of its value."""
    n = len(s)
    spans = {}
    pos = _WS.match(s, 0).end()
    if pos >= n or s[pos] != '{':
        raise MalformedRequest('body', 'expected a JSON object')
    pos = _WS.match(s, pos + 1).end()
    if pos < n and s[pos] == '}':
        pos += 1
    else:
        while True:
            if pos >= n or s[pos] != '"':
                raise _json_error('expected a string key', pos)
            key_end = _json_string_end(s, pos)
            key = s[pos + 1:key_end - 1]
            if '\\' in key:
                try:
                    key = json.loads(s[pos:key_end])
                except ValueError:
                    raise _json_error('invalid string key', pos) from None
            pos = _WS.match(s, key_end).end()
            if pos >= n or s[pos] != ':':
                raise _json_error("expected ':'", pos)
            start = _WS.match(s, pos + 1).end()
            end = _json_value_end(s, start, n)
            if key == 'destination' or key == 'pattern' or key == 'matcher':
                spans[key] = (start, end)
            pos = _WS.match(s, end).end()
            if pos < n and s[pos] == ',':
                pos = _WS.match(s, pos + 1).end()
            elif pos < n and s[pos] == '}':
                pos += 1
                break
            else:
                raise _json_error("expected ',' or '}'", pos)
    pos = _WS.match(s, pos).end()
    if pos != n:
        raise _json_error('trailing data', pos)
    return spans


# -- msgpack skimming ------------------------------------------------------

def _mp_error(what: str, pos: int) -> MalformedRequest:
    return MalformedRequest('body', f'invalid msgpack: {what} at offset {pos}')


def _mp_uint(b, pos: int, size: int, n: int) -> int:
    if pos + size > n:
        raise _mp_error('truncated', pos)
    return int.from_bytes(b[pos:pos + size], 'big')


# For each first byte >= 0xc0: (bytes of length field, fixed payload, kind)
# kind: 0 scalar, 1 array, 2 map, 3 reserved.
_MP_FORMATS = {
    0xc0: (0, 0, 0), 0xc1: (0, 0, 3), 0xc2: (0, 0, 0), 0xc3: (0, 0, 0),
    0xc4: (1, 0, 0), 0xc5: (2, 0, 0), 0xc6: (4, 0, 0),
    0xc7: (1, 1, 0), 0xc8: (2, 1, 0), 0xc9: (4, 1, 0),
    0xca: (0, 4, 0), 0xcb: (0, 8, 0),
    0xcc: (0, 1, 0), 0xcd: (0, 2, 0), 0xce: (0, 4, 0), 0xcf: (0, 8, 0),
    0xd0: (0, 1, 0), 0xd1: (0, 2, 0), 0xd2: (0, 4, 0), 0xd3: (0, 8, 0),
    0xd4: (0, 2, 0), 0xd5: (0, 3, 0), 0xd6: (0, 5, 0), 0xd7: (0, 9, 0),
    0xd8: (0, 17, 0),
    0xd9: (1, 0, 0), 0xda: (2, 0, 0), 0xdb: (4, 0, 0),
    0xdc: (2, 0, 1), 0xdd: (4, 0, 1), 0xde: (2, 0, 2), 0xdf: (4, 0, 2),
}


def _mp_header(b, pos: int, n: int):
    """Return (position after the header, payload bytes, child objects)."""
    if pos >= n:
        raise _mp_error('truncated', pos)
    c = b[pos]
    if c <= 0x7f or c >= 0xe0:
        return pos + 1, 0, 0
    if c <= 0x8f:
        return pos + 1, 0, 2 * (c & 0x0f)
    if c <= 0x9f:
        return pos + 1, 0, c & 0x0f
    if c <= 0xbf:
        return pos + 1, c & 0x1f, 0
    size, fixed, kind = _MP_FORMATS[c]
    if kind == 3:
        raise _mp_error('reserved byte 0xc1', pos)
    value = _mp_uint(b, pos + 1, size, n) if size else 0
    after = pos + 1 + size
    if kind == 0:
        return after, fixed + value, 0
    if kind == 1:
        return after, 0, value
    return after, 0, 2 * value


def _mp_value_end(b, pos: int, n: int) -> int:
    remaining = 1
    while remaining:
        remaining -= 1
        start = pos
        pos, payload, children = _mp_header(b, pos, n)
        pos += payload
        remaining += children
        if pos > n or remaining > n - pos:
            raise _mp_error('truncated', start)
    return pos


def _mp_str_payload(b, pos: int, end: int):
    """The bytes of the msgpack str at pos (ending at end), or None."""
    c = b[pos]
    if 0xa0 <= c <= 0xbf:
        return b[pos + 1:end]
    if c == 0xd9:
        return b[pos + 2:end]
    if c == 0xda:
        return b[pos + 3:end]
    if c == 0xdb:
        return b[pos + 5:end]
    return None


_MP_ROUTING = {b'destination': 'destination', b'pattern': 'pattern',
               b'matcher': 'matcher'}


def _skim_msgpack(b) -> dict:
    n = len(b)
    if n == 0:
        raise MalformedRequest('body', 'empty body')
    c = b[0]
    if not (0x80 <= c <= 0x8f or c == 0xde or c == 0xdf):
        raise MalformedRequest('body', 'expected a msgpack map')
    pos, _, children = _mp_header(b, 0, n)
    if children > n - pos:
        raise _mp_error('truncated', 0)
    spans = {}
    for _ in range(children // 2):
        key_start = pos
        pos = _mp_value_end(b, pos, n)
        key = _mp_str_payload(b, key_start, pos)
        start = pos
        pos = _mp_value_end(b, pos, n)
        if key is not None:
            name = _MP_ROUTING.get(key)
            if name is not None:
                spans[name] = (start, pos)
    if pos != n:
        raise _mp_error('trailing data', pos)
    return spans


def validate(body):
    """Check the shape of a decoded request and return it."""
    if not isinstance(body, dict):
        raise MalformedRequest(
            'body', f'expected a map of request fields, got '
                    f'{type(body).__name__}')
    for key in dict.keys(body):  # the stored keys, as the compiled core
        if not isinstance(key, str):
            raise MalformedRequest(
                'body', f'field names must be strings, got {short(key)}')
    if 'method' not in body:
        raise MalformedRequest('method', 'missing')
    method = body['method']
    if not isinstance(method, str):
        raise MalformedRequest(
            'method', f'expected a string, got {type(method).__name__}')
    arguments = body.get('arguments')
    if arguments is not None:
        if not isinstance(arguments, dict):
            raise MalformedRequest(
                'arguments', f'expected a map, got {type(arguments).__name__}')
        for key in dict.keys(arguments):
            if not isinstance(key, str):
                raise MalformedRequest(
                    'arguments', f'names must be strings, got {short(key)}')
    reply_to = body.get('reply_to')
    if reply_to:
        if not (isinstance(reply_to, dict) and
                isinstance(reply_to.get('exchange'), str) and
                isinstance(reply_to.get('routing_key'), str)):
            raise MalformedRequest(
                'reply_to', "expected {'exchange': str, 'routing_key': str}, "
                            f'got {short(reply_to)}')
    ticket = body.get('ticket')
    if ticket is not None and not isinstance(ticket, str):
        raise MalformedRequest(
            'ticket', f'expected a string, got {type(ticket).__name__}')
    return body


class Dispatcher:
    """Per-node decision maker: is this request for us, and what does it ask."""

    def __init__(self, hostname: str, accept=None) -> None:
        if hostname is not None and type(hostname) is not str:
            raise TypeError(  # as the compiled core's typed argument does
                f"Argument 'hostname' has incorrect type (expected str, "
                f"got {type(hostname).__name__})")
        self.hostname = hostname
        #: set of accepted content types, or None for all but the insecure.
        self.accept = None if accept is None else frozenset(accept)

    def addressed(self, destination, pattern, matcher) -> bool:
        """kombu's rule: destination first, then pattern+matcher, else all."""
        hostname = self.hostname
        if destination:
            try:
                return hostname in destination
            except TypeError:
                raise MalformedRequest(
                    'destination', f'expected a list of node names, got '
                                   f'{type(destination).__name__}') from None
        if pattern and matcher:
            if type(pattern) is str and type(matcher) is str:
                registered = _matchers.registry._matchers
                if matcher == 'glob' and GLOB_AS_IS and \
                        registered.get('glob') is fnmatch:
                    rx = _glob_cache.get(pattern)
                    if rx is None:
                        rx = _compiled(_glob_cache, pattern,
                                       translate(pattern))
                    return rx.match(hostname) is not None
                if matcher == 'pcre' and registered.get('pcre') is _PCRE:
                    rx = _pcre_cache.get(pattern)
                    if rx is None:
                        try:
                            rx = _compiled(_pcre_cache, pattern, pattern)
                        except re.error as exc:
                            raise MalformedRequest(
                                'pattern', f'invalid pcre pattern: {exc}'
                            ) from None
                    return rx.match(hostname) is not None
            return generic_match(hostname, pattern, matcher)
        return True

    def route(self, body):
        """Decide for an already decoded body: the request, or None."""
        if not isinstance(body, dict):
            return validate(body)
        if self.addressed(body.get('destination'), body.get('pattern'),
                          body.get('matcher')):
            return validate(body)
        return None

    def check_content_type(self, content_type) -> str:
        """The content type to decode with, or ContentDisallowed."""
        if content_type is None:
            content_type = 'application/data'
        elif not isinstance(content_type, str):
            raise MalformedRequest(
                'content_type', f'expected a string, got '
                                f'{type(content_type).__name__}')
        elif type(content_type) is not str:
            content_type = str.__str__(content_type)  # an exact str
        accept = self.accept
        if accept is not None:
            if content_type not in TRUSTED_CONTENT and \
                    content_type not in accept:
                raise ContentDisallowed(
                    f'Refusing to deserialize untrusted content of type '
                    f'{content_type}')
        elif content_type in INSECURE_CONTENT:
            raise ContentDisallowed(
                f'Refusing to deserialize insecure content of type '
                f'{content_type} (name it in accept to allow it)')
        return content_type

    def decode(self, body, content_type, content_encoding, headers):
        """Decide for a raw message: the validated request, or None."""
        content_type = self.check_content_type(content_type)
        route = headers.get(ROUTE_HEADER) if headers else None
        if route is not None:
            if not (isinstance(route, (list, tuple)) and len(route) == 3):
                raise MalformedRequest(
                    ROUTE_HEADER, 'expected [destination, pattern, matcher]')
            if not self.addressed(route[0], route[1], route[2]):
                return None
            if content_type == JSON_CT and native_json():
                body = json_text(body, content_encoding)
            return validate(load(body, content_type))
        if content_type == JSON_CT and native_json():
            text = json_text(body, content_encoding)
            spans = _skim_json(text)
            loads = kombu_json_loads
            if not self.addressed(
                    decode_span(loads, text, spans, 'destination'),
                    decode_span(loads, text, spans, 'pattern'),
                    decode_span(loads, text, spans, 'matcher')):
                return None
            return validate(load(text, JSON_CT))
        if content_type == MSGPACK_CT and native_msgpack():
            if not isinstance(body, (bytes, bytearray, memoryview)):
                raise MalformedRequest(
                    'body', f'expected bytes for msgpack, got '
                            f'{type(body).__name__}')
            data = bytes(body)
            spans = _skim_msgpack(data)
            loads = MSGPACK_DECODER
            if not self.addressed(
                    decode_span(loads, data, spans, 'destination'),
                    decode_span(loads, data, spans, 'pattern'),
                    decode_span(loads, data, spans, 'matcher')):
                return None
            return validate(load(data, MSGPACK_CT))
        return self.route(load(body, content_type))


def execute(handlers, state, method, arguments):
    """Find the handler and run it; errors become kombu's error reply."""
    try:
        handler = handlers[method]
    except KeyError as exc:
        logger.error('pidbox: no such command: %r', method)
        return error_reply(exc)
    try:
        return handler(state, **(arguments or {}))
    except SystemExit:
        raise
    except Exception as exc:
        logger.error('pidbox command error: %r', exc, exc_info=True)
        return error_reply(exc)


_node_logger = logging.getLogger('pidbox.node')


def run(node, request):
    """Run a validated request the way ``Node.dispatch`` would, and reply.

    Only for nodes whose dispatch methods are kombu's (see
    ``Node._has_default_dispatch``); others go through ``Node.dispatch``.
    """
    method = request['method']
    arguments = request.get('arguments')
    reply_to = request.get('reply_to')
    if _node_logger.isEnabledFor(logging.DEBUG):
        node._log_received(method, arguments, reply_to, request.get('ticket'))
    reply = execute(node.handlers, node.state, method, arguments)
    if reply_to:
        node._send_reply(reply, reply_to, request.get('ticket'))
    return reply


class RawHandler:
    """A node's callback for raw kombu messages: decide first, then run.

    Adjusts the node's clock from the header, asks the dispatcher whether the
    message is for this node, hands decode errors to the consumer's (or the
    node's) ``on_decode_error``, drops expired requests and runs the rest.
    Nothing raises out of it into the consumer.
    """

    __slots__ = ('node', 'dispatcher', 'consumer', 'callbacks', 'callback')

    def __init__(self, node, dispatcher, consumer=None):
        self.node = node
        self.dispatcher = dispatcher
        self.consumer = consumer
        # the consumer's callback list as listen() made it: while it stays
        # so, skip kombu's decode; once someone changes it, honour it
        self.callbacks = None if consumer is None else consumer.callbacks
        self.callback = None if consumer is None else self.callbacks[0]

    def __call__(self, message):
        if self.consumer is not None and not self.callbacks_as_made():
            return self.receive_decoded(message)
        node = self.node
        headers = message.headers
        self.adjust(headers)
        try:
            request = self.dispatcher.decode(
                message.body, message.content_type, message.content_encoding,
                headers)
        except (DecodeError, ContentDisallowed) as exc:
            self.decode_error(message, exc)
            return None
        except Exception as exc:
            _node_logger.error('pidbox: cannot route message: %r', exc,
                               exc_info=True)
            return None
        if request is None:
            return None
        if headers and headers.get('expires') and \
                node._expired(headers, request.get('reply_to')):
            return None
        return node._run(request)

    def callbacks_as_made(self) -> bool:
        """The consumer's callbacks are still the list listen() made."""
        callbacks = self.consumer.callbacks
        return (callbacks is self.callbacks and len(callbacks) == 1 and
                callbacks[0] is self.callback)

    def adjust(self, headers):
        """Adjust the node's clock from a message's ``clock`` header."""
        clock = headers.get('clock') if headers else None
        if type(clock) is not int:
            if clock:
                _node_logger.debug(
                    'pidbox: ignoring clock header %r: not an integer', clock)
            clock = 0
        self.node.adjust_clock(clock)

    def drop(self, payload) -> bool:
        """True when a transport payload is for another node: dropped unread.

        kombu's virtual transports (memory, Redis) hand each payload to
        :class:`PayloadFilter` before they build a Message and decode its
        body.  Only a well-formed route header that does not address this
        node drops a payload (after the clock is adjusted, as for every
        message); anything else, compressed bodies, refused content types and
        errors included, goes the usual way and is logged there.
        """
        consumer = self.consumer
        if consumer is None or consumer.on_message is not self or \
                not consumer.no_ack or not self.callbacks_as_made():
            return False
        if type(payload) is not dict:
            return False
        headers = payload.get('headers')
        if type(headers) is not dict or 'compression' in headers:
            return False
        route = headers.get(ROUTE_HEADER)
        if not (isinstance(route, (list, tuple)) and len(route) == 3):
            return False
        dispatcher = self.dispatcher
        try:
            dispatcher.check_content_type(payload.get('content-type'))
            if dispatcher.addressed(route[0], route[1], route[2]):
                return False
        except Exception:  # noqa: BLE001 - the usual path reports it
            return False
        self.adjust(headers)
        return True

    def decode_error(self, message, exc):
        on_error = getattr(self.consumer, 'on_decode_error', None)
        (on_error or self.node.on_decode_error)(message, exc)

    def receive_decoded(self, message):
        """kombu's way, for a consumer whose callbacks were changed."""
        try:
            body = message.decode()
        except Exception as exc:
            self.decode_error(message, exc)
            return None
        self.consumer.receive(body, message)
        return None


class PayloadFilter:
    """A virtual transport's delivery callback with a node's filter before it.

    ``deliver`` is what the channel's ``basic_consume`` registered (it builds
    the Message and calls the consumer); payloads ``handler.drop`` takes are
    not for this node and never reach it.
    """

    __slots__ = ('handler', 'deliver')

    def __init__(self, handler, deliver):
        self.handler = handler
        self.deliver = deliver

    def __call__(self, payload):
        if self.handler.drop(payload):
            return None
        return self.deliver(payload)
