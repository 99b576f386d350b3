"""Coverage-guided differential fuzzing of both dispatch cores with atheris.

Every input is split by ``atheris.FuzzedDataProvider`` into a node name, an
accept list, a content type and encoding, an optional ``pidbox-route`` header
and the raw body; both ``Dispatcher.decode`` implementations get the same
message and must give the same request (or both None), or raise the same
exception type with the same message.  Only ``MalformedRequest`` and
``ContentDisallowed`` may come out.  Any other outcome aborts with the input
saved by libFuzzer (``crash-<sha1>``), to be replayed with
``python benchmarks/fuzz_atheris.py crash-<sha1>``.

Coverage comes from the pure twin and the shared Python helpers (atheris
instruments Python bytecode; the compiled core is compared, not traced).

    pip install atheris
    python benchmarks/fuzz_atheris.py -runs=100000
    python benchmarks/fuzz_atheris.py -max_total_time=60 corpus/

Without the compiled core (``PIDBOX_NO_EXTENSIONS=1`` or an unbuilt tree)
there is nothing to compare and the script exits with status 2.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=['pidbox']):
    from pidbox import _core
    from pidbox.exceptions import ROUTE_HEADER, ContentDisallowed, \
        MalformedRequest

import msgpack  # noqa: E402
from kombu.utils.json import dumps  # noqa: E402

C = _core.compiled
P = _core.pure

HOSTNAMES = ['w1', 'worker1@example.com', 'celery@host-1', 'w\u00e9@x', '']
ACCEPTS = [None, frozenset(['application/json']),
           frozenset(['application/json', 'application/x-msgpack'])]
CONTENT_TYPES = ['application/json', 'application/x-msgpack',
                 'application/json', 'application/x-msgpack',
                 'application/x-python-serialize', 'application/x-yaml',
                 'application/data', 'text/unknown', None]
ENCODINGS = ['utf-8', 'binary', None, 'latin-1']
ROUTES = [None, [None, None, None], [['w1'], None, None],
          [None, 'w*', 'glob'], [None, 'w.', 'pcre'], [None, '(', 'pcre'],
          [None, 'x', 'nope'], ['w1', None, None], 'bad', [1, 2]]
WIRE_ERRORS = (MalformedRequest, ContentDisallowed)

#: seeds: well-formed requests in both formats, so mutation starts near
#: the interesting paths instead of at random bytes
SEEDS = [
    {'method': 'ping', 'arguments': {}, 'destination': None},
    {'method': 'ping', 'arguments': {'a': [1, 2.5, None]},
     'destination': ['w1', 'w2'], 'reply_to': {
         'exchange': 'reply.celery.pidbox', 'routing_key': 'k'},
     'ticket': 't'},
    {'method': 'stats', 'destination': [], 'pattern': 'w*',
     'matcher': 'glob'},
    {'method': 'x', 'pattern': 'w.', 'matcher': 'pcre', 'destination': 'w1'},
]

def outcome(fn):
    try:
        value = fn()
    except Exception as exc:  # compared, then checked to be a wire error
        return ('raise', type(exc), str(exc))
    return ('ok', type(value), repr(value))


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    hostname = HOSTNAMES[fdp.ConsumeIntInRange(0, len(HOSTNAMES) - 1)]
    accept = ACCEPTS[fdp.ConsumeIntInRange(0, len(ACCEPTS) - 1)]
    content_type = CONTENT_TYPES[
        fdp.ConsumeIntInRange(0, len(CONTENT_TYPES) - 1)]
    encoding = ENCODINGS[fdp.ConsumeIntInRange(0, len(ENCODINGS) - 1)]
    route = ROUTES[fdp.ConsumeIntInRange(0, len(ROUTES) - 1)]
    headers = None if route is None else {ROUTE_HEADER: route}
    seed = fdp.ConsumeIntInRange(0, 2 * len(SEEDS))
    body = fdp.ConsumeBytes(fdp.remaining_bytes())
    if seed < len(SEEDS):  # splice the fuzzed bytes into a seed request
        req = SEEDS[seed]
        base = (dumps(req).encode() if content_type != 'application/x-msgpack'
                else msgpack.packb(req, use_bin_type=True))
        at = len(body) % (len(base) + 1)
        body = base[:at] + body + base[at + len(body) % 7:]
    c = outcome(lambda: C.Dispatcher(hostname, accept).decode(
        body, content_type, encoding, headers))
    p = outcome(lambda: P.Dispatcher(hostname, accept).decode(
        body, content_type, encoding, headers))
    if c != p:
        raise AssertionError(f'cores differ on {body!r}:\n'
                             f'  compiled: {c!r}\n  pure:     {p!r}')
    if c[0] == 'raise' and not issubclass(c[1], WIRE_ERRORS):
        raise AssertionError(f'unexpected {c[1].__name__} on {body!r}: '
                             f'{c[2]}')


def main() -> None:
    if C is None:
        print('fuzz_atheris: the compiled core is not loaded; nothing to '
              'compare (build it, and unset PIDBOX_NO_EXTENSIONS)',
              file=sys.stderr)
        sys.exit(2)
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()  # libFuzzer prints "Done <runs> runs" and exits


if __name__ == '__main__':
    main()
