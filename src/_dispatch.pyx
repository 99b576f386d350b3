# cython: language_level=3, embedsignature=True
"""Compiled dispatch core: the hot path of a pidbox node.

The same algorithm as the pure twin ``pidbox/_dispatch_py.py``, statement for
statement (read that module's docstring first); here the skimming walks the
JSON text and the msgpack bytes in C without building a single Python object
for the values it skips, a destination list is searched with a length check
and a memcmp per name, and a glob of ``*``, ``?`` and text is matched by a
wildcard walk instead of ``fnmatch``'s regex (the differential tests hold
both to the twin's and ``fnmatch``'s answers).  Errors and slow paths are
shared with the twin through ``pidbox._codec`` and ``pidbox.exceptions``.
"""

import json
import logging
import re
from fnmatch import fnmatch, translate

from kombu import matcher as _matchers
from kombu.clocks import LamportClock
from kombu.serialization import registry as _kombu_serializers

from pidbox._codec import (
    GLOB_AS_IS, JSON_CT, MAX_JSON_DEPTH, MSGPACK_CT, MSGPACK_DECODER,
    call_handler, check_json_depth,
    decode_span,
    error_reply, generic_match, json_text, kombu_json_loads, load,
    native_json, native_msgpack, short, undecodable,
)
from pidbox.exceptions import (
    INSECURE_CONTENT, ROUTE_HEADER, TRUSTED_CONTENT, ContentDisallowed,
    DecodeError, MalformedRequest,
)

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_GetItem
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
from cpython.object cimport PyObject_RichCompareBool, Py_EQ
from cpython.tuple cimport PyTuple_GET_ITEM, PyTuple_GET_SIZE
from cpython.method cimport PyMethod_Check, PyMethod_GET_FUNCTION, PyMethod_GET_SELF
from cpython.object cimport PyObject
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.string cimport memchr, memcmp

cdef extern from "Python.h":
    int PyUnicode_KIND(object o)
    void* PyUnicode_DATA(object o)
    Py_UCS4 PyUnicode_READ(int kind, void* data, Py_ssize_t index) nogil
    Py_ssize_t PyUnicode_GET_LENGTH(object o)
    object PyUnicode_Substring(object o, Py_ssize_t start, Py_ssize_t end)

__all__ = ('Dispatcher', 'RawHandler', 'PayloadFilter', 'validate', 'execute',
           'run')

logger = logging.getLogger('pidbox.dispatch')

cdef object _PCRE = re.match
cdef Py_ssize_t _CACHE_SIZE = 256
cdef dict _glob_cache = {}
cdef dict _pcre_cache = {}
cdef object _re_error = re.error
cdef object _serializer_decoders = None


cdef object _compiled(dict cache, str pattern, str source):
    if len(cache) >= _CACHE_SIZE:
        cache.clear()
    rx = re.compile(source)
    cache[pattern] = rx
    return rx


cdef int _wildcard_match(str name, str pattern):
    """``fnmatchcase(name, pattern)`` for patterns of ``*``, ``?`` and text.

    1 or 0; -1 when the pattern holds ``[`` (a character class: the caller
    uses ``fnmatch.translate``'s regex).  ``translate`` makes ``*`` ``.*``
    and ``?`` ``.`` under DOTALL and escapes everything else, anchored at
    both ends: so this is the two-pointer wildcard match that backs up to
    the last ``*`` on a mismatch, over code points.
    """
    if name is None:
        return -1
    cdef Py_ssize_t n = PyUnicode_GET_LENGTH(name)
    cdef Py_ssize_t m = PyUnicode_GET_LENGTH(pattern)
    cdef int nkind = PyUnicode_KIND(name)
    cdef int pkind = PyUnicode_KIND(pattern)
    cdef void* ndata = PyUnicode_DATA(name)
    cdef void* pdata = PyUnicode_DATA(pattern)
    cdef Py_ssize_t i = 0, j = 0, star = -1, resume = 0
    cdef Py_UCS4 c
    for j in range(m):
        if PyUnicode_READ(pkind, pdata, j) == 91:   # '['
            return -1
    j = 0
    while i < n:
        if j < m:
            c = PyUnicode_READ(pkind, pdata, j)
            if c == 42:   # '*'
                star = j
                resume = i
                j += 1
                continue
            if c == 63 or c == PyUnicode_READ(nkind, ndata, i):   # '?'
                i += 1
                j += 1
                continue
        if star < 0:
            return 0
        # let the last '*' take one more character, and go on after it
        j = star + 1
        resume += 1
        i = resume
    while j < m and PyUnicode_READ(pkind, pdata, j) == 42:
        j += 1
    return j == m


# -- JSON skimming ---------------------------------------------------------

cdef object _json_error(str what, Py_ssize_t pos):
    return MalformedRequest('body', f'invalid JSON: {what} at offset {pos}')


cdef inline bint _is_ws(Py_UCS4 c) nogil:
    return c == 32 or c == 9 or c == 10 or c == 13


cdef inline Py_ssize_t _skip_ws(int kind, void* data, Py_ssize_t pos,
                                Py_ssize_t n) nogil:
    while pos < n and _is_ws(PyUnicode_READ(kind, data, pos)):
        pos += 1
    return pos


cdef Py_ssize_t _json_string_end(int kind, void* data, Py_ssize_t pos,
                                 Py_ssize_t n) except -1:
    cdef Py_ssize_t i = pos + 1
    cdef Py_UCS4 c
    cdef const char* base
    cdef const char* quote
    if kind == 1:
        # one byte per char: find the quote, then look for a backslash before
        # it; only strings with escapes take the char loop below.
        base = <const char*>data
        if i < n:
            quote = <const char*>memchr(base + i, 34, n - i)
            if quote != NULL and memchr(base + i, 92, quote - (base + i)) == NULL:
                return (quote - base) + 1
    while i < n:
        c = PyUnicode_READ(kind, data, i)
        if c == 92:        # backslash
            i += 2
        elif c == 34:      # quote
            return i + 1
        else:
            i += 1
    raise _json_error('unterminated string', pos)


cdef Py_ssize_t _json_value_end(int kind, void* data, Py_ssize_t pos,
                                Py_ssize_t n) except -1:
    cdef Py_UCS4 c
    cdef Py_ssize_t start, depth, end
    if pos >= n:
        raise _json_error('expected a value', pos)
    c = PyUnicode_READ(kind, data, pos)
    if c == 34:
        return _json_string_end(kind, data, pos, n)
    if c == 91 or c == 123:    # [ {
        start = pos
        depth = 1
        pos += 1
        while pos < n:
            c = PyUnicode_READ(kind, data, pos)
            if c == 34:
                pos = _json_string_end(kind, data, pos, n)
            elif c == 91 or c == 123:
                depth += 1
                pos += 1
            elif c == 93 or c == 125:
                depth -= 1
                pos += 1
                if depth == 0:
                    return pos
            else:
                pos += 1
        raise _json_error('unterminated array or object', start)
    end = pos
    while end < n:
        c = PyUnicode_READ(kind, data, end)
        if c == 44 or c == 125 or c == 93 or _is_ws(c):
            break
        end += 1
    if end == pos:
        raise _json_error('expected a value', pos)
    return end


cdef bint _chars_equal(int kind, void* data, Py_ssize_t pos, Py_ssize_t n,
                       const char* name, Py_ssize_t size):
    cdef Py_ssize_t i
    if n != size:
        return False
    for i in range(size):
        if PyUnicode_READ(kind, data, pos + i) != <Py_UCS4>name[i]:
            return False
    return True


cdef int _json_routing_index(int kind, void* data, Py_ssize_t pos,
                             Py_ssize_t n):
    """0, 1, 2 for destination, pattern, matcher; -1 for any other key."""
    if _chars_equal(kind, data, pos, n, b'destination', 11):
        return 0
    if _chars_equal(kind, data, pos, n, b'pattern', 7):
        return 1
    if _chars_equal(kind, data, pos, n, b'matcher', 7):
        return 2
    return -1


cdef int _name_index(str key):
    if key == 'destination':
        return 0
    if key == 'pattern':
        return 1
    if key == 'matcher':
        return 2
    return -1


cdef dict _skim_json(str s):
    cdef Py_ssize_t spans[3][2]
    _skim_json_into(s, spans)
    return _spans_dict(spans)


cdef int _skim_json_into(str s, Py_ssize_t spans[3][2]) except -1:
    cdef int kind = PyUnicode_KIND(s)
    cdef void* data = PyUnicode_DATA(s)
    cdef Py_ssize_t n = PyUnicode_GET_LENGTH(s)
    cdef Py_ssize_t pos, key_end, start, end, i
    cdef bint escaped
    cdef int index
    for i in range(3):
        spans[i][0] = -1
    pos = _skip_ws(kind, data, 0, n)
    if pos >= n or PyUnicode_READ(kind, data, pos) != 123:
        raise MalformedRequest('body', 'expected a JSON object')
    pos = _skip_ws(kind, data, pos + 1, n)
    if pos < n and PyUnicode_READ(kind, data, pos) == 125:
        pos += 1
    else:
        while True:
            if pos >= n or PyUnicode_READ(kind, data, pos) != 34:
                raise _json_error('expected a string key', pos)
            key_end = _json_string_end(kind, data, pos, n)
            escaped = False
            for i in range(pos + 1, key_end - 1):
                if PyUnicode_READ(kind, data, i) == 92:
                    escaped = True
                    break
            if escaped:
                try:
                    key = json.loads(s[pos:key_end])
                except ValueError:
                    raise _json_error('invalid string key', pos) from None
                index = _name_index(key) if type(key) is str else -1
            else:
                index = _json_routing_index(kind, data, pos + 1,
                                            key_end - pos - 2)
            pos = _skip_ws(kind, data, key_end, n)
            if pos >= n or PyUnicode_READ(kind, data, pos) != 58:
                raise _json_error("expected ':'", pos)
            start = _skip_ws(kind, data, pos + 1, n)
            end = _json_value_end(kind, data, start, n)
            if index >= 0:
                spans[index][0] = start
                spans[index][1] = end
            pos = _skip_ws(kind, data, end, n)
            if pos < n and PyUnicode_READ(kind, data, pos) == 44:
                pos = _skip_ws(kind, data, pos + 1, n)
            elif pos < n and PyUnicode_READ(kind, data, pos) == 125:
                pos += 1
                break
            else:
                raise _json_error("expected ',' or '}'", pos)
    pos = _skip_ws(kind, data, pos, n)
    if pos != n:
        raise _json_error('trailing data', pos)
    return 0


cdef dict _spans_dict(Py_ssize_t spans[3][2]):
    cdef dict result = {}
    if spans[0][0] >= 0:
        result['destination'] = (spans[0][0], spans[0][1])
    if spans[1][0] >= 0:
        result['pattern'] = (spans[1][0], spans[1][1])
    if spans[2][0] >= 0:
        result['matcher'] = (spans[2][0], spans[2][1])
    return result


# -- msgpack skimming ------------------------------------------------------

cdef object _mp_error(str what, Py_ssize_t pos):
    return MalformedRequest('body', f'invalid msgpack: {what} at offset {pos}')


cdef Py_ssize_t _mp_uint(const unsigned char* b, Py_ssize_t pos, int size,
                         Py_ssize_t n, unsigned long long* out) except -1:
    cdef unsigned long long value = 0
    cdef int i
    if pos + size > n:
        raise _mp_error('truncated', pos)
    for i in range(size):
        value = (value << 8) | b[pos + i]
    out[0] = value
    return 0


cdef Py_ssize_t _mp_header(const unsigned char* b, Py_ssize_t pos,
                           Py_ssize_t n, unsigned long long* payload,
                           unsigned long long* children) except -1:
    """Read one header: return the position after it, set payload/children."""
    cdef unsigned char c
    cdef int size = 0
    cdef unsigned long long fixed = 0, value = 0
    cdef int kind = 0
    if pos >= n:
        raise _mp_error('truncated', pos)
    c = b[pos]
    payload[0] = 0
    children[0] = 0
    if c <= 0x7f or c >= 0xe0:
        return pos + 1
    if c <= 0x8f:
        children[0] = 2 * (c & 0x0f)
        return pos + 1
    if c <= 0x9f:
        children[0] = c & 0x0f
        return pos + 1
    if c <= 0xbf:
        payload[0] = c & 0x1f
        return pos + 1
    if c == 0xc1:
        raise _mp_error('reserved byte 0xc1', pos)
    if c == 0xc0 or c == 0xc2 or c == 0xc3:
        pass
    elif c <= 0xc6:
        size = 1 << (c - 0xc4)
    elif c <= 0xc9:
        size = 1 << (c - 0xc7)
        fixed = 1
    elif c == 0xca:
        fixed = 4
    elif c == 0xcb:
        fixed = 8
    elif c <= 0xcf:
        fixed = 1 << (c - 0xcc)
    elif c <= 0xd3:
        fixed = 1 << (c - 0xd0)
    elif c <= 0xd8:
        fixed = (1 << (c - 0xd4)) + 1
    elif c <= 0xdb:
        size = 1 << (c - 0xd9)
    elif c <= 0xdd:
        size = 2 << (c - 0xdc)
        kind = 1
    else:
        size = 2 << (c - 0xde)
        kind = 2
    if size:
        _mp_uint(b, pos + 1, size, n, &value)
    if kind == 0:
        payload[0] = fixed + value
    elif kind == 1:
        children[0] = value
    else:
        children[0] = 2 * value
    return pos + 1 + size


cdef Py_ssize_t _mp_value_end(const unsigned char* b, Py_ssize_t pos,
                              Py_ssize_t n) except -1:
    cdef unsigned long long remaining = 1, payload, children
    cdef Py_ssize_t start
    cdef unsigned char c
    while remaining:
        remaining -= 1
        start = pos
        if pos < n:
            # inline the headers a revoke is made of (small ints, short
            # strings): the same checks and errors as _mp_header's path
            c = b[pos]
            if c <= 0x7f or c >= 0xe0:
                pos += 1
                if remaining > <unsigned long long>(n - pos):
                    raise _mp_error('truncated', start)
                continue
            if 0xa0 <= c <= 0xbf or (c == 0xd9 and pos + 2 <= n):
                if c == 0xd9:
                    payload = b[pos + 1]
                    pos += 2
                else:
                    payload = c & 0x1f
                    pos += 1
                if payload > <unsigned long long>(n - pos):
                    raise _mp_error('truncated', start)
                pos += <Py_ssize_t>payload
                if remaining > <unsigned long long>(n - pos):
                    raise _mp_error('truncated', start)
                continue
        pos = _mp_header(b, pos, n, &payload, &children)
        if payload > <unsigned long long>(n - pos):
            raise _mp_error('truncated', start)
        pos += <Py_ssize_t>payload
        remaining += children
        if remaining > <unsigned long long>(n - pos):
            raise _mp_error('truncated', start)
    return pos


cdef int _mp_routing_index(const unsigned char* b, Py_ssize_t pos,
                           Py_ssize_t end):
    cdef unsigned char c = b[pos]
    cdef Py_ssize_t start
    if 0xa0 <= c <= 0xbf:
        start = pos + 1
    elif c == 0xd9:
        start = pos + 2
    elif c == 0xda:
        start = pos + 3
    elif c == 0xdb:
        start = pos + 5
    else:
        return -1
    cdef Py_ssize_t size = end - start
    cdef const char* p = <const char*>b + start
    if size == 11 and p[:11] == b'destination':
        return 0
    if size == 7 and p[:7] == b'pattern':
        return 1
    if size == 7 and p[:7] == b'matcher':
        return 2
    return -1


cdef dict _skim_msgpack(bytes data):
    cdef Py_ssize_t spans[3][2]
    _skim_msgpack_into(data, spans)
    return _spans_dict(spans)


cdef int _skim_msgpack_into(bytes data, Py_ssize_t spans[3][2]) except -1:
    cdef const unsigned char* b = <const unsigned char*>PyBytes_AS_STRING(data)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
    cdef Py_ssize_t pos, key_start, start, i
    cdef unsigned long long payload, children, pair
    cdef int index
    for i in range(3):
        spans[i][0] = -1
    if n == 0:
        raise MalformedRequest('body', 'empty body')
    cdef unsigned char c = b[0]
    if not (0x80 <= c <= 0x8f or c == 0xde or c == 0xdf):
        raise MalformedRequest('body', 'expected a msgpack map')
    pos = _mp_header(b, 0, n, &payload, &children)
    if children > <unsigned long long>(n - pos):
        raise _mp_error('truncated', 0)
    for pair in range(children // 2):
        key_start = pos
        pos = _mp_value_end(b, pos, n)
        index = _mp_routing_index(b, key_start, pos)
        start = pos
        pos = _mp_value_end(b, pos, n)
        if index >= 0:
            spans[index][0] = start
            spans[index][1] = pos
    if pos != n:
        raise _mp_error('trailing data', pos)
    return 0


# -- routing values without a decoder call ---------------------------------
#
# The values of destination, pattern and matcher are nearly always null, a
# plain string or a list of plain strings: those are built (or, for a
# destination, searched) here, exactly as the decoder would give them; any
# other value goes through the registered decoder like in the twin.

cdef object _DECODERS = _kombu_serializers._decoders
cdef object _JSON_DEFAULTS = getattr(kombu_json_loads, '__defaults__', None)
cdef object _json_decoder = None
if (_JSON_DEFAULTS is not None and len(_JSON_DEFAULTS) == 3 and
        _JSON_DEFAULTS[0] is json.loads):
    # what kombu's loads(text) runs: json.loads(text, object_hook=...)
    _json_decoder = json.JSONDecoder(object_hook=_JSON_DEFAULTS[2])
cdef object _JSONDecodeError = json.JSONDecodeError


cdef inline bint _native_json() except -1:
    cdef PyObject* p = PyDict_GetItem(_DECODERS, JSON_CT)
    return p != NULL and <object>p is kombu_json_loads


cdef inline bint _native_msgpack() except -1:
    cdef PyObject* p = PyDict_GetItem(_DECODERS, MSGPACK_CT)
    return MSGPACK_DECODER is not None and p != NULL and \
        <object>p is MSGPACK_DECODER


cdef object _plain_decoder = json.JSONDecoder()

cdef extern from "string.h":
    void* memmem(const void* haystack, size_t haystacklen,
                 const void* needle, size_t needlelen) nogil


cdef bint _may_hold_typed(str text):
    """False only when kombu's object hook cannot change anything in text.

    The hook rewrites objects whose keys are ``__type__`` and ``__value__``;
    without that literal and without a ``\\u`` escape (which could spell
    it) no such key exists, and the plain decoder gives the same result.
    """
    cdef Py_ssize_t n = PyUnicode_GET_LENGTH(text)
    cdef const char* data
    cdef const char* p
    if PyUnicode_KIND(text) != 1:
        return True
    data = <const char*>PyUnicode_DATA(text)
    if memmem(data, n, b'__type__', 8) != NULL:
        return True
    p = <const char*>memchr(data, 92, n)
    while p != NULL:
        if p + 1 < data + n and p[1] == 117:   # u
            return True
        p = <const char*>memchr(p + 2, 92, data + n - p - 2) \
            if p + 2 < data + n else NULL
    return False


cdef str _json_text(object body, object content_encoding):
    """``json_text``, with the common case (exact bytes, valid UTF-8) in C."""
    if type(body) is bytes:
        try:
            return PyUnicode_DecodeUTF8(PyBytes_AS_STRING(body),
                                        PyBytes_GET_SIZE(body), NULL)
        except UnicodeDecodeError:
            pass  # json_text raises the error both cores raise
    return json_text(body, content_encoding)


cdef void _check_json_depth(str text) except *:
    """``check_json_depth``: its bracket count in C, its exact scan shared."""
    cdef int kind = PyUnicode_KIND(text)
    cdef void* data = PyUnicode_DATA(text)
    cdef Py_ssize_t n = PyUnicode_GET_LENGTH(text), i, brackets = 0
    cdef Py_UCS4 c
    for i in range(n):
        c = PyUnicode_READ(kind, data, i)
        if c == 91 or c == 123:
            brackets += 1
    if brackets > MAX_JSON_DEPTH:
        check_json_depth(text)


cdef object _json_load(str text):
    """``load(text, JSON_CT)`` with kombu's decoder, minus its per-call setup."""
    if _json_decoder is None:
        return load(text, JSON_CT)
    cdef int kind = PyUnicode_KIND(text)
    cdef void* data = PyUnicode_DATA(text)
    cdef Py_ssize_t n = PyUnicode_GET_LENGTH(text), end
    _check_json_depth(text)
    try:
        if PyUnicode_GET_LENGTH(text) and \
                PyUnicode_READ(PyUnicode_KIND(text), PyUnicode_DATA(text),
                               0) == 0xfeff:
            raise _JSONDecodeError(
                'Unexpected UTF-8 BOM (decode using utf-8-sig)', text, 0)
        if _may_hold_typed(text):
            return _json_decoder.decode(text)
        # json.JSONDecoder.decode, step by step, without the object hook
        value, end = _plain_decoder.raw_decode(text,
                                               _skip_ws(kind, data, 0, n))
        end = _skip_ws(kind, data, end, n)
        if end != n:
            raise _JSONDecodeError('Extra data', text, end)
        return value
    except RecursionError:  # as in _codec.load: the depth hit is stack-bound
        raise MalformedRequest(
            'body', f'cannot decode {JSON_CT}: nested too deeply') from None
    except Exception as exc:
        raise MalformedRequest(
            'body', f'cannot decode {JSON_CT}: {exc!r}') from None


cdef bint _json_plain_string(int kind, void* data, Py_ssize_t start,
                             Py_ssize_t end) noexcept:
    """True if data[start:end] is a JSON string without escapes or controls."""
    cdef Py_ssize_t i
    cdef Py_UCS4 c
    if end - start < 2 or PyUnicode_READ(kind, data, start) != 34 or \
            PyUnicode_READ(kind, data, end - 1) != 34:
        return False
    for i in range(start + 1, end - 1):
        c = PyUnicode_READ(kind, data, i)
        if c == 92 or c == 34 or c < 32:
            return False
    return True


cdef object _json_value(str s, int kind, void* data, Py_ssize_t start,
                        Py_ssize_t end, str key):
    """What kombu's JSON decoder gives for s[start:end] (None: no span)."""
    cdef list items
    cdef Py_ssize_t pos, e
    if start < 0:
        return None
    if _chars_equal(kind, data, start, end - start, b'null', 4):
        return None
    if _json_plain_string(kind, data, start, end):
        return PyUnicode_Substring(s, start + 1, end - 1)
    if PyUnicode_READ(kind, data, start) == 91:
        items = []
        pos = _skip_ws(kind, data, start + 1, end)
        if pos < end and PyUnicode_READ(kind, data, pos) == 93:
            if pos + 1 == end:
                return items
        else:
            while pos < end and PyUnicode_READ(kind, data, pos) == 34:
                e = _json_string_end(kind, data, pos, end)
                if not _json_plain_string(kind, data, pos, e):
                    break
                items.append(PyUnicode_Substring(s, pos + 1, e - 1))
                pos = _skip_ws(kind, data, e, end)
                if pos < end and PyUnicode_READ(kind, data, pos) == 44:
                    pos = _skip_ws(kind, data, pos + 1, end)
                elif pos + 1 == end and PyUnicode_READ(kind, data, pos) == 93:
                    return items
                else:
                    break
    return decode_span(kombu_json_loads, s, {key: (start, end)}, key)


cdef bint _same_chars(int kind, void* data, Py_ssize_t pos, str name,
                      Py_ssize_t size) noexcept:
    cdef int nkind = PyUnicode_KIND(name)
    cdef void* ndata = PyUnicode_DATA(name)
    cdef Py_ssize_t i
    if nkind == kind:
        return memcmp(<char*>data + pos * kind, ndata, size * kind) == 0
    for i in range(size):
        if PyUnicode_READ(kind, data, pos + i) != \
                PyUnicode_READ(nkind, ndata, i):
            return False
    return True


cdef int _json_has_name(int kind, void* data, Py_ssize_t start,
                        Py_ssize_t end, str name) except -2:
    """Search a destination without building it.

    1 found, 0 not found (a non-empty list of plain strings), 2 an empty
    list, -1 any other value (decode it instead).
    """
    cdef Py_ssize_t pos, e, size
    cdef int found = 0
    if start < 0 or name is None or PyUnicode_READ(kind, data, start) != 91:
        return -1
    size = PyUnicode_GET_LENGTH(name)
    pos = _skip_ws(kind, data, start + 1, end)
    if pos < end and PyUnicode_READ(kind, data, pos) == 93:
        return 2 if pos + 1 == end else -1
    while pos < end and PyUnicode_READ(kind, data, pos) == 34:
        e = _json_string_end(kind, data, pos, end)
        if not _json_plain_string(kind, data, pos, e):
            return -1
        if not found and e - pos - 2 == size and \
                _same_chars(kind, data, pos + 1, name, size):
            found = 1
        pos = _skip_ws(kind, data, e, end)
        if pos < end and PyUnicode_READ(kind, data, pos) == 44:
            pos = _skip_ws(kind, data, pos + 1, end)
        elif pos + 1 == end and PyUnicode_READ(kind, data, pos) == 93:
            return found
        else:
            return -1
    return -1


cdef Py_ssize_t _mp_str_start(const unsigned char* b, Py_ssize_t pos) noexcept:
    """Where the payload of the msgpack str at pos starts, or -1."""
    cdef unsigned char c = b[pos]
    if 0xa0 <= c <= 0xbf:
        return pos + 1
    if c == 0xd9:
        return pos + 2
    if c == 0xda:
        return pos + 3
    if c == 0xdb:
        return pos + 5
    return -1


cdef inline bint _mp_is_array(unsigned char c) noexcept:
    return 0x90 <= c <= 0x9f or c == 0xdc or c == 0xdd


cdef object _mp_value(bytes data, Py_ssize_t start, Py_ssize_t end, str key):
    """What kombu's msgpack decoder gives for data[start:end]."""
    cdef const unsigned char* b = <const unsigned char*>PyBytes_AS_STRING(data)
    cdef Py_ssize_t p, pos, e
    cdef unsigned long long payload, children, i
    cdef list items
    if start < 0:
        return None
    if b[start] == 0xc0 and end == start + 1:
        return None
    p = _mp_str_start(b, start)
    try:
        if p >= 0:
            return PyUnicode_DecodeUTF8(<const char*>b + p, end - p, NULL)
        if _mp_is_array(b[start]):
            pos = _mp_header(b, start, end, &payload, &children)
            items = []
            for i in range(children):
                e = _mp_value_end(b, pos, end)
                p = _mp_str_start(b, pos)
                if p < 0:
                    break
                items.append(
                    PyUnicode_DecodeUTF8(<const char*>b + p, e - p, NULL))
                pos = e
            else:
                if pos == end:
                    return items
    except UnicodeDecodeError:
        pass
    return decode_span(MSGPACK_DECODER, data, {key: (start, end)}, key)


cdef int _mp_has_name(const unsigned char* b, Py_ssize_t start,
                      Py_ssize_t end, bytes name) except -2:
    """Like :func:`_json_has_name`, for a msgpack array of ASCII strs."""
    cdef Py_ssize_t pos, e, p, j, size
    cdef unsigned long long payload, children, i
    cdef int found = 0
    cdef const char* n
    if start < 0 or name is None or not _mp_is_array(b[start]):
        return -1
    n = PyBytes_AS_STRING(name)
    size = PyBytes_GET_SIZE(name)
    pos = _mp_header(b, start, end, &payload, &children)
    if children == 0:
        return 2 if pos == end else -1
    for i in range(children):
        e = _mp_value_end(b, pos, end)
        p = _mp_str_start(b, pos)
        if p < 0:
            return -1
        for j in range(p, e):
            if b[j] >= 0x80:
                return -1
        if not found and e - p == size and \
                memcmp(<const char*>b + p, n, size) == 0:
            found = 1
        pos = e
    return found if pos == end else -1


cdef int _name_in(str name, object names) except -1:
    """``name in names``: a length check and a memcmp per exact str item.

    Python's ``in`` compares through the full rich comparison for every
    item; the destination of a revoke may name a hundred nodes.  Items that
    are not exact strings are compared as ``in`` compares them.
    """
    if name is None:   # a Node may be named None
        return name in names
    cdef Py_ssize_t i, size
    cdef Py_ssize_t length = PyUnicode_GET_LENGTH(name)
    cdef int kind = PyUnicode_KIND(name)
    cdef void* data = PyUnicode_DATA(name)
    cdef object item
    cdef bint is_list = type(names) is list
    if not is_list and type(names) is not tuple:
        return name in names
    i = 0
    while True:
        # re-read the size: an item's __eq__ may change a list
        if is_list:
            if i >= PyList_GET_SIZE(names):
                return 0
            item = <object>PyList_GET_ITEM(names, i)
        else:
            if i >= PyTuple_GET_SIZE(names):
                return 0
            item = <object>PyTuple_GET_ITEM(names, i)
        if item is name:
            return 1
        if type(item) is str:
            # equal strings have equal kinds (PEP 393 keeps them canonical)
            if PyUnicode_GET_LENGTH(item) == length and \
                    PyUnicode_KIND(item) == kind and \
                    memcmp(PyUnicode_DATA(item), data, length * kind) == 0:
                return 1
        elif PyObject_RichCompareBool(item, name, Py_EQ):
            return 1
        i += 1


# -- request shape ---------------------------------------------------------

cpdef object validate(object body):
    """Check the shape of a decoded request and return it."""
    if not isinstance(body, dict):
        raise MalformedRequest(
            'body', f'expected a map of request fields, got '
                    f'{type(body).__name__}')
    for key in <dict>body:
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
        for key in <dict>arguments:
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


cdef class Dispatcher:
    """Per-node decision maker: is this request for us, and what does it ask."""

    cdef public str hostname
    cdef public object accept
    cdef object _name_of_utf8
    cdef bytes _name_utf8

    def __init__(self, str hostname, accept=None):
        self.hostname = hostname
        self.accept = None if accept is None else frozenset(accept)

    cpdef bint addressed(self, object destination, object pattern,
                         object matcher) except -1:
        """kombu's rule: destination first, then pattern+matcher, else all."""
        cdef str hostname = self.hostname
        cdef int found
        if destination:
            try:
                return _name_in(hostname, destination)
            except TypeError:
                raise MalformedRequest(
                    'destination', f'expected a list of node names, got '
                                   f'{type(destination).__name__}') from None
        if pattern and matcher:
            if type(pattern) is str and type(matcher) is str:
                registered = _matchers.registry._matchers
                if matcher == 'glob' and GLOB_AS_IS and \
                        registered.get('glob') is fnmatch:
                    found = _wildcard_match(hostname, pattern)
                    if found >= 0:
                        return found
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
                        except _re_error as exc:
                            raise MalformedRequest(
                                'pattern', f'invalid pcre pattern: {exc}'
                            ) from None
                    return rx.match(hostname) is not None
            return generic_match(hostname, pattern, matcher)
        return True

    cpdef object route(self, object body):
        """Decide for an already decoded body: the request, or None."""
        if not isinstance(body, dict):
            return validate(body)
        if self.addressed(body.get('destination'), body.get('pattern'),
                          body.get('matcher')):
            return validate(body)
        return None

    cpdef str check_content_type(self, object content_type):
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

    cdef bytes _hostname_utf8(self):
        """The hostname as UTF-8 (None if it has none), cached per name."""
        hostname = self.hostname
        if self._name_of_utf8 is not hostname:
            try:
                self._name_utf8 = hostname.encode('utf-8')
            except (AttributeError, UnicodeEncodeError):
                self._name_utf8 = None
            self._name_of_utf8 = hostname
        return self._name_utf8

    cpdef object decode(self, object body, object content_type,
                        object content_encoding, object headers):
        """Decide for a raw message: the validated request, or None."""
        cdef str ct = self.check_content_type(content_type)
        cdef str text
        cdef bytes data
        cdef Py_ssize_t spans[3][2]
        cdef int kind, found
        cdef void* chars
        cdef const unsigned char* b
        route = _header(headers, ROUTE_HEADER)
        if route is not None:
            if not (isinstance(route, (list, tuple)) and len(route) == 3):
                raise MalformedRequest(
                    ROUTE_HEADER, 'expected [destination, pattern, matcher]')
            if not self.addressed(route[0], route[1], route[2]):
                return None
            if ct == JSON_CT and _native_json():
                return validate(_json_load(_json_text(body, content_encoding)))
            return validate(load(body, ct))
        if ct == JSON_CT and _native_json():
            text = _json_text(body, content_encoding)
            _skim_json_into(text, spans)
            kind = PyUnicode_KIND(text)
            chars = PyUnicode_DATA(text)
            # the destination decides when it is a non-empty list of plain
            # names; pattern and matcher are still decoded, as in the twin.
            found = _json_has_name(kind, chars, spans[0][0], spans[0][1],
                                   self.hostname)
            if found == 0 or found == 1:
                _json_value(text, kind, chars, spans[1][0], spans[1][1],
                            'pattern')
                _json_value(text, kind, chars, spans[2][0], spans[2][1],
                            'matcher')
            elif not self.addressed(
                    _json_value(text, kind, chars, spans[0][0], spans[0][1],
                                'destination'),
                    _json_value(text, kind, chars, spans[1][0], spans[1][1],
                                'pattern'),
                    _json_value(text, kind, chars, spans[2][0], spans[2][1],
                                'matcher')):
                return None
            if found == 0:
                return None
            return validate(_json_load(text))
        if ct == MSGPACK_CT and _native_msgpack():
            if not isinstance(body, (bytes, bytearray, memoryview)):
                raise MalformedRequest(
                    'body', f'expected bytes for msgpack, got '
                            f'{type(body).__name__}')
            data = bytes(body)
            _skim_msgpack_into(data, spans)
            b = <const unsigned char*>PyBytes_AS_STRING(data)
            found = _mp_has_name(b, spans[0][0], spans[0][1],
                                 self._hostname_utf8())
            if found == 0 or found == 1:
                _mp_value(data, spans[1][0], spans[1][1], 'pattern')
                _mp_value(data, spans[2][0], spans[2][1], 'matcher')
            elif not self.addressed(
                    _mp_value(data, spans[0][0], spans[0][1], 'destination'),
                    _mp_value(data, spans[1][0], spans[1][1], 'pattern'),
                    _mp_value(data, spans[2][0], spans[2][1], 'matcher')):
                return None
            if found == 0:
                return None
            return validate(_msgpack_load(data))
        return self.route(load(body, ct))


cpdef object execute(object handlers, object state, object method,
                     object arguments):
    """Find the handler and run it; errors become kombu's error reply."""
    try:
        handler = handlers[method]
    except KeyError as exc:
        logger.error('pidbox: no such command: %r', method)
        return error_reply(exc)
    try:
        if arguments:
            if type(arguments) is dict:
                return handler(state, **arguments)
            return call_handler(handler, state, arguments)
        return handler(state)
    except SystemExit:
        raise
    except Exception as exc:
        logger.error('pidbox command error: %r', exc, exc_info=True)
        return error_reply(exc)


cdef inline object _header(object headers, object name):
    """``headers.get(name) if headers else None``, a C lookup for a dict."""
    cdef PyObject* value
    if type(headers) is dict:
        value = PyDict_GetItem(headers, name)
        return None if value == NULL else <object>value
    return headers.get(name) if headers else None


cdef object _node_logger = logging.getLogger('pidbox.node')

try:
    import msgpack as _msgpack
    _unpackb = _msgpack.unpackb if _msgpack.version >= (0, 4) else None
except ImportError:
    _unpackb = None


cdef object _msgpack_load(bytes data):
    """``load(data, MSGPACK_CT)`` without the registry lookup.

    Only while kombu's own msgpack decoder is registered (the caller checks
    :func:`native_msgpack`); that decoder is ``unpackb(s, raw=False)``.
    """
    if _unpackb is None:
        return load(data, MSGPACK_CT)
    try:
        return _unpackb(data, raw=False)
    except Exception as exc:
        raise undecodable(MSGPACK_CT, exc) from None


#: (name, function) pairs a node's class must still hold, and its instance
#: must not shadow, for Node._run to call run(): Node's own dispatch
#: methods (pidbox.node._DEFAULT_DISPATCH), _run and its check.
cdef tuple _RUN_CHECKS = None


cdef bint _runs_here(object node) except -1:
    """True when ``node._run(request)`` would be ``run(node, request)``."""
    global _RUN_CHECKS
    if _RUN_CHECKS is None:
        from pidbox.node import _DEFAULT_DISPATCH, Node
        _RUN_CHECKS = tuple(_DEFAULT_DISPATCH) + tuple(
            (name, Node.__dict__[name])
            for name in ('_run', '_has_default_dispatch'))
    cls = type(node)
    instance = getattr(node, '__dict__', None)
    for name, function in _RUN_CHECKS:
        if getattr(cls, name, None) is not function:
            return False
        if instance is not None and name in instance:
            return False
    return True


cpdef object run(object node, object request):
    """Run a validated request the way ``Node.dispatch`` would, and reply.

    Only for nodes whose dispatch methods are kombu's (see
    ``Node._has_default_dispatch``); others go through ``Node.dispatch``.
    """
    method = request['method']
    arguments = request.get('arguments')
    reply_to = request.get('reply_to')
    if _node_logger.isEnabledFor(10):
        node._log_received(method, arguments, reply_to, request.get('ticket'))
    reply = execute(node.handlers, node.state, method, arguments)
    if reply_to:
        node._send_reply(reply, reply_to, request.get('ticket'))
    return reply


cdef object _lamport_adjust = LamportClock.adjust


cdef class _Lamport:
    """``LamportClock.adjust(other)`` without its Python frame.

    Holds the clock's lock methods while the clock keeps the same lock, so a
    message costs one attribute read, the two lock calls and the value
    update, as kombu's ``adjust`` does it under the same lock.
    """

    cdef object clock
    cdef object mutex
    cdef object acquire
    cdef object release

    def __cinit__(self, clock):
        self.clock = clock
        self.mutex = None

    cdef inline int adjust(self, object other) except -1:
        clock = self.clock
        mutex = clock.mutex
        if mutex is not self.mutex:
            self.acquire = mutex.acquire
            self.release = mutex.release
            self.mutex = mutex
        self.acquire()
        try:
            value = clock.value
            if other > value:
                value = other
            clock.value = value + 1
        finally:
            self.release()
        return 0


cdef class RawHandler:
    """A node's callback for raw kombu messages: decide first, then run.

    Adjusts the node's clock from the header, asks the dispatcher whether the
    message is for this node, hands decode errors to the consumer's (or the
    node's) ``on_decode_error``, drops expired requests and runs the rest.
    Nothing raises out of it into the consumer.
    """

    cdef readonly object node
    cdef readonly Dispatcher dispatcher
    cdef readonly object consumer
    cdef readonly object callbacks
    cdef readonly object callback
    cdef object adjust_fn   # node.adjust_clock as it was at creation
    cdef _Lamport clock     # its LamportClock, when adjust is kombu's own

    def __init__(self, node, Dispatcher dispatcher, consumer=None):
        self.node = node
        self.dispatcher = dispatcher
        self.consumer = consumer
        adjust = self.adjust_fn = node.adjust_clock
        self.clock = None
        if getattr(adjust, '__func__', None) is _lamport_adjust and \
                type(adjust.__self__) is LamportClock:
            self.clock = _Lamport(adjust.__self__)
        # the consumer's callback list as listen() made it: while it stays
        # so, skip kombu's decode; once someone changes it, honour it
        self.callbacks = None if consumer is None else consumer.callbacks
        self.callback = None if consumer is None else self.callbacks[0]

    def __call__(self, message):
        if self.consumer is not None and not self._callbacks_as_made():
            return self.receive_decoded(message)
        node = self.node
        headers = message.headers
        self._adjust(headers)
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
        if _runs_here(node):
            return run(node, request)
        return node._run(request)

    cdef inline bint _callbacks_as_made(self):
        """The consumer's callbacks are still the list listen() made."""
        callbacks = self.consumer.callbacks
        return (callbacks is self.callbacks and len(callbacks) == 1 and
                callbacks[0] is self.callback)

    def callbacks_as_made(self):
        """The consumer's callbacks are still the list listen() made."""
        return self._callbacks_as_made()

    cdef int _adjust(self, object headers) except -1:
        clock = _header(headers, 'clock')
        if type(clock) is not int:
            if clock:
                _node_logger.debug(
                    'pidbox: ignoring clock header %r: not an integer', clock)
            clock = 0
        adjust = self.node.adjust_clock
        if adjust is self.adjust_fn and self.clock is not None:
            self.clock.adjust(clock)
        else:
            adjust(clock)
        return 0

    def adjust(self, headers):
        """Adjust the node's clock from a message's ``clock`` header."""
        self._adjust(headers)

    cpdef bint drop(self, object payload) except -1:
        """True when a transport payload is for another node: dropped unread.

        kombu's virtual transports (memory, Redis) hand each payload to
        :class:`PayloadFilter` before they build a Message and decode its
        body.  Only a well-formed route header that does not address this
        node drops a payload (after the clock is adjusted, as for every
        message); anything else, compressed bodies, refused content types and
        errors included, goes the usual way and is logged there.
        """
        cdef PyObject* found
        consumer = self.consumer
        if consumer is None or consumer.on_message is not self or \
                not consumer.no_ack or not self._callbacks_as_made():
            return False
        if type(payload) is not dict:
            return False
        found = PyDict_GetItem(payload, 'headers')
        if found == NULL or type(<object>found) is not dict:
            return False
        headers = <object>found
        if PyDict_GetItem(headers, 'compression') != NULL:
            return False
        found = PyDict_GetItem(headers, ROUTE_HEADER)
        if found == NULL:
            return False
        route = <object>found
        if not (isinstance(route, (list, tuple)) and len(route) == 3):
            return False
        dispatcher = self.dispatcher
        try:
            dispatcher.check_content_type(payload.get('content-type'))
            if dispatcher.addressed(route[0], route[1], route[2]):
                return False
        except Exception:
            return False
        self._adjust(headers)
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


cdef class PayloadFilter:
    """A virtual transport's delivery callback with a node's filter before it.

    ``deliver`` is what the channel's ``basic_consume`` registered (it builds
    the Message and calls the consumer); payloads ``handler.drop`` takes are
    not for this node and never reach it.
    """

    cdef readonly RawHandler handler
    cdef readonly object deliver

    def __init__(self, RawHandler handler, deliver):
        self.handler = handler
        self.deliver = deliver

    def __call__(self, payload):
        if self.handler.drop(payload):
            return None
        return self.deliver(payload)
