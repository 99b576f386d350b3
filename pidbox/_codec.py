"""Slow-path helpers both dispatch implementations call.

Nothing here runs for a message that is not for this node; it decodes what
the node will act on, through kombu's serializer and matcher registries, and
turns their failures into :class:`MalformedRequest` errors that name a field.
"""

from __future__ import annotations

import os
import posixpath
import re

from kombu import matcher as _matchers
from kombu.serialization import registry as serializers
from kombu.utils.json import loads as kombu_json_loads

from .exceptions import MalformedRequest

__all__ = (
    'JSON_CT', 'MSGPACK_CT', 'MSGPACK_DECODER', 'short', 'error_reply',
    'call_handler',
    'load', 'json_text', 'decode_span', 'generic_match', 'native_json',
    'native_msgpack', 'check_json_depth', 'MAX_JSON_DEPTH', 'undecodable',
)

JSON_CT = 'application/json'
MSGPACK_CT = 'application/x-msgpack'
#: kombu's own msgpack decoder, taken when pidbox is imported, so that a
#: decoder registered later in its place turns skimming off.
MSGPACK_DECODER = serializers._decoders.get(MSGPACK_CT)


def native_json() -> bool:
    """True while kombu's JSON decoder is the registered one."""
    return serializers._decoders.get(JSON_CT) is kombu_json_loads


def native_msgpack() -> bool:
    """True while kombu's msgpack decoder is the registered one."""
    return (MSGPACK_DECODER is not None and
            serializers._decoders.get(MSGPACK_CT) is MSGPACK_DECODER)


def short(value) -> str:
    """A repr short enough for a log line, whatever a sender put there."""
    text = repr(value)
    return text if len(text) <= 64 else text[:61] + '...'


def call_handler(handler, state, arguments):
    """``handler(state, **arguments)`` spelt by CPython.

    The compiled core calls this for arguments that are not a plain dict, so
    a non-mapping fails with CPython's TypeError (as in the pure twin) instead
    of being converted by Cython's ``dict(arguments)``.
    """
    return handler(state, **arguments)


def error_reply(exc: BaseException) -> dict:
    """The reply kombu sends when a handler raised."""
    return {'error': repr(exc)}


#: JSON nested deeper than this is refused before decoding.  Python's JSON
#: decoder recurses, and where it hits the recursion limit depends on the
#: caller's stack; a fixed cap makes the outcome the same on both cores.
MAX_JSON_DEPTH = 512

_STRING_TAIL = re.compile(r'[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_STRUCTURE = re.compile(r'["\[\]{}]')


def check_json_depth(text: str, field: str = 'body') -> None:
    """Refuse JSON text nested deeper than :data:`MAX_JSON_DEPTH`."""
    if text.count('[') + text.count('{') <= MAX_JSON_DEPTH:
        return
    depth = 0
    pos = 0
    search = _STRUCTURE.search
    while True:
        m = search(text, pos)
        if m is None:
            return
        i = m.start()
        c = text[i]
        if c == '"':
            end = _STRING_TAIL.match(text, i + 1)
            if end is None:
                return  # unterminated: the decoder says so
            pos = end.end()
            continue
        if c == '[' or c == '{':
            depth += 1
            if depth > MAX_JSON_DEPTH:
                raise MalformedRequest(
                    field, f'JSON nested deeper than {MAX_JSON_DEPTH} levels')
        else:
            depth -= 1
        pos = i + 1


def load(body, content_type: str):
    """Decode a whole body with the decoder kombu has registered."""
    if content_type == JSON_CT and type(body) is str:
        check_json_depth(body)
    decoder = serializers._decoders.get(content_type)
    if decoder is None:
        raise MalformedRequest(
            'content_type', f'no decoder registered for {content_type!r}')
    try:
        return decoder(body)
    except Exception as exc:
        raise undecodable(content_type, exc) from None


def undecodable(content_type: str, exc: Exception) -> MalformedRequest:
    """The error for a body the decoder of ``content_type`` refused."""
    if isinstance(exc, RecursionError):
        # where the limit cuts in depends on the caller's stack (and so on
        # the core): say so without naming the container it hit
        return MalformedRequest(
            'body', f'cannot decode {content_type}: nested too deeply')
    return MalformedRequest('body', f'cannot decode {content_type}: {exc!r}')


def json_text(body, content_encoding) -> str:
    """The JSON text of a body, read as kombu's JSON decoder reads it.

    kombu decodes bytes as UTF-8 whatever ``content_encoding`` says, so a
    node runs exactly what a kombu node would run; the argument is kept for
    the callers' sake.
    """
    if isinstance(body, str):
        # an exact str: the compiled core types its text as one
        return body if type(body) is str else str.__str__(body)
    try:
        return str(body, 'utf-8')
    except (UnicodeDecodeError, TypeError) as exc:
        raise MalformedRequest(
            'body', f'cannot decode text as utf-8: {exc}') from None


def decode_span(loads, data, spans: dict, key: str):
    """Decode the value of one routing key found by a skim (None if absent)."""
    span = spans.get(key)
    if span is None:
        return None
    value = data[span[0]:span[1]]
    if type(value) is str:
        check_json_depth(value, key)
    try:
        return loads(value)
    except RecursionError:
        raise MalformedRequest(key, 'cannot decode value: nested too deeply'
                               ) from None
    except Exception as exc:
        raise MalformedRequest(key, f'cannot decode value: {exc!r}') from None


#: ``fnmatch`` compares names as given (``os.path.normcase`` leaves them
#: alone): the cores may match globs themselves.  Elsewhere (Windows lowers
#: the case) they leave it to kombu's matcher, which calls ``fnmatch``.
GLOB_AS_IS = os.path.normcase is posixpath.normcase


def generic_match(hostname: str, pattern, matcher) -> bool:
    """kombu's matcher registry, for matchers and types without a fast path."""
    try:
        return bool(_matchers.match(hostname, pattern, matcher))
    except _matchers.MatcherNotInstalled:
        raise MalformedRequest(
            'matcher', f'no matcher installed for {short(matcher)}') from None
    except Exception as exc:
        raise MalformedRequest(
            'pattern', f'{short(matcher)} matcher failed on {short(pattern)}: '
                       f'{exc!r}') from None
