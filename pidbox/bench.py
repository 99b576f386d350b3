"""Workloads and timers shared by ``pidbox bench`` and ``benchmarks/``.

Three implementations are compared on the very same raw messages:
``compiled`` (a pidbox Node on the Cython core), ``pure`` (a pidbox Node on
the pure-Python twin) and ``kombu`` (``kombu.pidbox.Node`` fed the way a
kombu consumer feeds it: ``kombu.serialization.loads`` of the raw body, then
``handle_message``).  Replies are never published by the core timers: the
reply envelope is built, the publish is stubbed out, for all three alike.
"""

from __future__ import annotations

from functools import partial

import random
import socket
import threading
import uuid
from statistics import median
from time import perf_counter

from kombu.serialization import dumps, loads, prepare_accept_content

from .exceptions import ROUTE_HEADER

__all__ = (
    'IMPLEMENTATIONS', 'SERIALIZERS', 'CASES', 'HOSTNAME', 'RawMessage',
    'make_request', 'encode', 'core_runner', 'make_node', 'DrainBench',
    'drain_throughput',
    'run_bench', 'format_table',
)

#: Names of the three implementations, in report order.
IMPLEMENTATIONS = ('compiled', 'pure', 'kombu')
SERIALIZERS = ('json', 'msgpack')
ACCEPT = ['json', 'msgpack']

#: The node every core case is decided for.
HOSTNAME = 'worker-7@bench-host-07.example.com'

#: name -> what the request is, and whether it is for HOSTNAME.
CASES = {
    'ping_other': 'small ping for another node',
    'revoke35k_other': 'revoke, 1000 task ids, 100 other destinations',
    'glob_nomatch': 'glob pattern that does not match',
    'pcre_match': 'pcre pattern that matches (cast runs here)',
    'call_me': 'call for this node (reply envelope built)',
}

#: The 35 KB message can arrive from a pidbox client (routing header) or a
#: stock kombu/Celery client (no header); the others come from pidbox.
STOCK_CASES = ('ping_other', 'revoke35k_other')


class RawMessage:
    """What a transport hands a consumer: the body, undecoded."""

    __slots__ = ('body', 'content_type', 'content_encoding', 'headers',
                 'properties', 'delivery_info')

    def __init__(self, body, content_type, content_encoding, headers):
        self.body = body
        self.content_type = content_type
        self.content_encoding = content_encoding
        self.headers = headers
        self.properties = {}
        self.delivery_info = {}


def _task_ids(n: int, seed: int = 1) -> list:
    rng = random.Random(seed)
    return [str(uuid.UUID(int=rng.getrandbits(128), version=4))
            for _ in range(n)]


def _hostnames(n: int, skip: str = HOSTNAME) -> list:
    names = [f'worker-{i}@bench-host-{i:02d}.example.com'
             for i in range(100, 100 + n)]
    return [name for name in names if name != skip][:n]


def make_request(case: str, hostname: str = HOSTNAME):
    """The request body (a dict in kombu's field order) for one case."""
    def request(method, arguments, destination=None, pattern=None,
                matcher=None, reply=False):
        body = {'method': method, 'arguments': arguments,
                'destination': destination, 'pattern': pattern,
                'matcher': matcher}
        if reply:
            body['ticket'] = str(uuid.UUID(int=7, version=4))
            body['reply_to'] = {'exchange': 'reply.bench.pidbox',
                                'routing_key': 'c1b2d3e4-0000-4000-8000-00000000a11c'}
        return body

    if case == 'ping_other':
        return request('ping', {}, destination=['worker-1@elsewhere'])
    if case == 'revoke35k_other':
        return request('revoke', {'task_id': _task_ids(1000),
                                  'terminate': False, 'signal': 'SIGTERM'},
                       destination=_hostnames(100, hostname))
    if case == 'glob_nomatch':
        return request('ping', {}, pattern='beat-*@*', matcher='glob')
    if case == 'pcre_match':
        return request('rate_limit',
                       {'task_name': 'proj.tasks.add', 'rate_limit': '10/m'},
                       pattern=r'worker-\d+@bench-host-\d+\.example\.com',
                       matcher='pcre')
    if case == 'call_me':
        return request('stats', {}, destination=[hostname], reply=True)
    raise KeyError(f'no such bench case: {case!r} (one of {", ".join(CASES)})')


def encode(request: dict, serializer: str = 'json', route: bool = True,
           expires: float = 0) -> RawMessage:
    """The raw message a client publishes for ``request``.

    ``route=True`` is a pidbox client (``pidbox-route`` header),
    ``route=False`` a stock kombu/Celery one.
    """
    content_type, content_encoding, body = dumps(request, serializer)
    if isinstance(body, str):
        body = body.encode(content_encoding)
    headers = {'clock': 42, 'expires': expires}
    if route:
        headers[ROUTE_HEADER] = [list(request.get('destination') or ()),
                                 request.get('pattern') or '',
                                 request.get('matcher') or '']
    return RawMessage(body, content_type, content_encoding, headers)


# -- handlers every node in a benchmark runs --------------------------------

def _ping(state, **kwargs):
    return {'ok': 'pong'}


def _revoke(state, task_id=(), terminate=False, signal=None, **kwargs):
    return {'ok': f'tasks {len(task_id)} flagged as revoked'}


def _rate_limit(state, task_name=None, rate_limit=None, **kwargs):
    return {'ok': f'new rate limit set successfully: {rate_limit}'}


def _stats(state, **kwargs):
    return {'pid': 4242, 'clock': 42, 'uptime': 1234,
            'pool': {'max-concurrency': 2, 'processes': [4243, 4244]},
            'total': {'proj.tasks.add': 1000}}


def handlers() -> dict:
    return {'ping': _ping, 'revoke': _revoke, 'rate_limit': _rate_limit,
            'stats': _stats}


def _no_reply(*args, **kwargs):
    """Stands in for the reply publish: the envelope was already built."""


def _mailbox_class(impl: str):
    if impl == 'kombu':
        from kombu.pidbox import Mailbox
    else:
        from pidbox import Mailbox
    return Mailbox


def _core_module(impl: str):
    from . import _core
    if impl == 'compiled':
        if _core.compiled is None:
            raise RuntimeError(
                'the compiled core is not loaded (PIDBOX_NO_EXTENSIONS set, '
                'or the extension was not built): cannot bench "compiled"')
        return _core.compiled
    return _core.pure


def make_node(impl: str, hostname: str = HOSTNAME, connection=None,
              namespace: str = 'bench', channel=None, mailbox_type='direct'):
    """A Node of ``impl`` with the bench handlers; replies not stubbed."""
    mailbox = _mailbox_class(impl)(namespace, type=mailbox_type,
                                   accept=ACCEPT)
    if connection is not None:
        mailbox = mailbox(connection)
    node = mailbox.Node(hostname, handlers=handlers(), channel=channel)
    if impl != 'kombu':
        node.dispatch_core = _core_module(impl)
    return node


def core_runner(impl: str, raw: RawMessage, hostname: str = HOSTNAME):
    """A no-argument callable that hands ``raw`` to a node of ``impl`` once.

    It returns what the node returned: None for a message that is not for
    it, else the handler's result.
    """
    node = make_node(impl, hostname)
    node.reply = _no_reply
    if impl == 'kombu':
        accept = prepare_accept_content(ACCEPT)
        handle_message = node.handle_message
        body, ct, ce = raw.body, raw.content_type, raw.content_encoding

        def run():
            return handle_message(loads(body, ct, ce, accept=accept), raw)
        return run
    # what Node.listen() installs as the consumer's on_message
    handler = node.dispatch_core.RawHandler(
        node, node.dispatch_core.Dispatcher(
            hostname, prepare_accept_content(ACCEPT)))
    return partial(handler, raw)


# -- end to end on a broker ------------------------------------------------

def _publish_raw(producer, exchange, raw: RawMessage):
    producer.publish(raw.body, exchange=exchange, routing_key='',
                     content_type=raw.content_type,
                     content_encoding=raw.content_encoding,
                     headers=dict(raw.headers), retry=False)


_SERIALIZER_OF = {'application/json': 'json', 'application/x-msgpack': 'msgpack'}


def _stop_message(hostname: str, serializer: str, route: bool):
    return encode({'method': 'bench_stop', 'arguments': {},
                   'destination': [hostname], 'pattern': None,
                   'matcher': None}, serializer, route)


class DrainBench:
    """One node of ``impl`` on ``url`` and a queue to fill and drain.

    :meth:`fill` publishes the messages (and a stop command for the node
    behind them); :meth:`drain` consumes until the node ran the stop command.
    Only :meth:`drain` is meant to be timed.
    """

    def __init__(self, impl: str, raws, url: str = 'memory://',
                 hostname: str = HOSTNAME, polling_interval: float = 0.001,
                 transport_options=None):
        from kombu import Connection, Producer
        self.raws = list(raws)
        options = {'polling_interval': polling_interval,
                   **(transport_options or {})}
        self.conn = Connection(url, transport_options=options)
        self.pub = Connection(url, transport_options=options)
        namespace = f'bench-{impl}-{uuid.uuid4().hex[:8]}'
        self.node = make_node(impl, hostname, self.conn, namespace,
                              channel=self.conn.channel())
        self.done = []
        self.node.handlers['bench_stop'] = lambda state: self.done.append(1)
        self.node.reply = _no_reply
        self.consumer = self.node.listen()
        self.producer = Producer(self.pub.channel(), auto_declare=False)
        self.exchange = self.node.mailbox.exchange.name
        self.stop = _stop_message(
            hostname, _SERIALIZER_OF[self.raws[0].content_type],
            ROUTE_HEADER in self.raws[0].headers)

    def fill(self):
        self.done.clear()
        for raw in self.raws:
            _publish_raw(self.producer, self.exchange, raw)
        _publish_raw(self.producer, self.exchange, self.stop)

    def drain(self):
        drain = self.conn.drain_events
        while not self.done:
            drain(timeout=5)

    def close(self):
        try:
            self.consumer.cancel()
            self.node.channel.close()
        finally:
            self.conn.release()
            self.pub.release()


def drain_throughput(impl: str, raws, url: str = 'memory://',
                     hostname: str = HOSTNAME, polling_interval=0.001):
    """Messages per second a single node of ``impl`` consumes ``raws`` at."""
    bench = DrainBench(impl, raws, url, hostname, polling_interval)
    try:
        bench.fill()
        start = perf_counter()
        bench.drain()
        return len(bench.raws) / (perf_counter() - start)
    finally:
        bench.close()


# -- pidbox bench: N nodes, a realistic mix ----------------------------------

def _mix(nodes: list, rng: random.Random, serializer: str, route: bool,
         count: int) -> list:
    revoke_ids = _task_ids(1000)
    others = _hostnames(100, '')
    out = []
    for i in range(count):
        r = rng.random()
        target = rng.choice(nodes)
        if r < 0.55:      # ping one node
            body = {'method': 'ping', 'arguments': {},
                    'destination': [target], 'pattern': None,
                    'matcher': None}
        elif r < 0.75:    # glob over a subset
            body = {'method': 'ping', 'arguments': {},
                    'destination': None,
                    'pattern': target.split('@')[0] + '@*',
                    'matcher': 'glob'}
        elif r < 0.90:    # rate limit by pcre, one node
            body = {'method': 'rate_limit',
                    'arguments': {'task_name': 'proj.tasks.add',
                                  'rate_limit': '10/m'},
                    'destination': None,
                    'pattern': '^' + target.replace('.', r'\.') + '$',
                    'matcher': 'pcre'}
        else:             # a big revoke: 1000 ids, 100 destinations
            body = {'method': 'revoke',
                    'arguments': {'task_id': revoke_ids, 'terminate': False,
                                  'signal': 'SIGTERM'},
                    'destination': others[:99] + [target],
                    'pattern': None, 'matcher': None}
        out.append(encode(body, serializer, route))
    return out


class _Progress:
    """A progress bar on stderr; plain lines when stderr is not a TTY."""

    def __init__(self, total: int, stream=None, enabled=True):
        import sys
        self.stream = sys.stderr if stream is None else stream
        self.tty = bool(getattr(self.stream, 'isatty', lambda: False)())
        self.total = max(total, 1)
        self.done = 0
        self.enabled = enabled

    def step(self, label: str, n: int = 1):
        self.done = min(self.total, self.done + n)
        if not self.enabled:
            return
        if self.tty:
            width = 30
            filled = int(width * self.done / self.total)
            self.stream.write(
                f'\r[{"#" * filled}{"." * (width - filled)}] '
                f'{100 * self.done // self.total:3d}% {label:<40.40}')
            if self.done >= self.total:
                self.stream.write('\n')
        else:
            self.stream.write(
                f'pidbox bench: {self.done}/{self.total} {label}\n')
        self.stream.flush()


def _node_thread(node, conn, stop: threading.Event, ready: threading.Event):
    consumer = node.listen()
    ready.set()
    drain = conn.drain_events
    try:
        while not stop.is_set():
            try:
                drain(timeout=0.05)
            except socket.timeout:
                pass
    finally:
        try:
            consumer.cancel()
        except Exception:  # the broker may already be gone at shutdown
            pass


def _run_impl(impl: str, url: str, n_nodes: int, n_messages: int,
              n_calls: int, serializer: str, progress: _Progress,
              polling_interval: float) -> dict:
    from kombu import Connection, Producer
    namespace = f'bench-{impl}-{uuid.uuid4().hex[:8]}'
    options = {'polling_interval': polling_interval}
    names = [f'worker-{i}@bench-host-{i:02d}.example.com'
             for i in range(1, n_nodes + 1)]
    conns = [Connection(url, transport_options=options) for _ in names]
    nodes = []
    counts = {name: 0 for name in names}
    finished = {name: threading.Event() for name in names}
    for name, conn in zip(names, conns):
        node = make_node(impl, name, conn, namespace,
                         channel=conn.channel(), mailbox_type='fanout')
        node.handlers['bench_stop'] = (
            lambda state, _name=name: finished[_name].set())
        nodes.append(node)
    client_conn = Connection(url, transport_options=options)
    rng = random.Random(7)
    mix = _mix(names, rng, serializer, impl != 'kombu', n_messages)
    try:
        # throughput: queue the mix (fanout: every node gets every message),
        # then let all nodes drain it.
        consumers = [node.listen() for node in nodes]
        producer = Producer(client_conn.channel(), auto_declare=False)
        exchange = nodes[0].mailbox.exchange
        exchange(producer.channel).declare()
        for raw in mix:
            _publish_raw(producer, exchange.name, raw)
        stop = encode({'method': 'bench_stop', 'arguments': {},
                       'destination': None, 'pattern': None,
                       'matcher': None}, serializer, impl != 'kombu')
        _publish_raw(producer, exchange.name, stop)
        progress.step(f'{impl}: {len(mix)} messages queued')
        errors = []

        def drain_until_stopped(node, conn):
            try:
                while not finished[node.hostname].is_set():
                    conn.drain_events(timeout=5)
                    counts[node.hostname] += 1
            except BaseException as exc:  # reported below
                errors.append(exc)
                finished[node.hostname].set()

        threads = [threading.Thread(target=drain_until_stopped,
                                    args=(node, conn), daemon=True)
                   for node, conn in zip(nodes, conns)]
        start = perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = perf_counter() - start
        for consumer in consumers:
            consumer.cancel()
        if errors:
            raise errors[0]
        delivered = len(mix) * n_nodes
        progress.step(f'{impl}: throughput measured')

        # latency: nodes consume in the background; sequential calls.
        stop_nodes = threading.Event()
        readies = []
        threads = []
        for node, conn in zip(nodes, conns):
            ready = threading.Event()
            readies.append(ready)
            threads.append(threading.Thread(
                target=_node_thread, args=(node, conn, stop_nodes, ready),
                daemon=True))
            threads[-1].start()
        for ready in readies:
            ready.wait(10)
        mailbox = nodes[0].mailbox(client_conn)
        latencies = []
        try:
            mailbox.call([names[0]], 'ping', timeout=5)     # warm up
            for i in range(n_calls):
                target = names[i % n_nodes]
                t0 = perf_counter()
                replies = mailbox.call([target], 'ping', timeout=5)
                latencies.append(perf_counter() - t0)
                if not replies:
                    raise RuntimeError(
                        f'{impl}: no reply from {target} within 5 s')
        finally:
            stop_nodes.set()
            for thread in threads:
                thread.join(5)
        progress.step(f'{impl}: latency measured')
    finally:
        for conn in conns + [client_conn]:
            conn.release()
    latencies.sort()
    return {
        'impl': impl,
        'throughput': delivered / elapsed,
        'latency_median': median(latencies) if latencies else float('nan'),
        'latency_p95': (latencies[int(0.95 * (len(latencies) - 1))]
                        if latencies else float('nan')),
        'messages': len(mix),
        'nodes': n_nodes,
        'calls': len(latencies),
    }


def run_bench(url: str = 'memory://', nodes: int = 4, messages: int = 5000,
              calls: int = 200, serializer: str = 'json',
              implementations=IMPLEMENTATIONS, polling_interval: float = 0.0005,
              progress: bool = True) -> list:
    """Run the mix on ``nodes`` nodes per implementation; one dict each."""
    bar = _Progress(3 * len(implementations), enabled=progress)
    return [_run_impl(impl, url, nodes, messages, calls, serializer, bar,
                      polling_interval)
            for impl in implementations]


def format_table(results: list) -> str:
    base = {r['impl']: r for r in results}.get('kombu')
    lines = [f'{"implementation":<14} {"msgs/s":>10} {"vs kombu":>9} '
             f'{"call p50 ms":>12} {"call p95 ms":>12}']
    for r in results:
        ratio = (f'{r["throughput"] / base["throughput"]:8.2f}x'
                 if base else '        -')
        lines.append(f'{r["impl"]:<14} {r["throughput"]:>10.0f} {ratio:>9} '
                     f'{r["latency_median"] * 1e3:>12.3f} '
                     f'{r["latency_p95"] * 1e3:>12.3f}')
    return '\n'.join(lines)


def plot(results: list, path: str, title: str = 'pidbox bench') -> None:
    """Write a PNG bar chart of throughput and latency (needs matplotlib)."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit(
            "pidbox bench: --plot needs matplotlib; install it with "
            "pip install 'pidbox[plot]'") from None
    names = [r['impl'] for r in results]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    left.bar(names, [r['throughput'] for r in results], color='#4c72b0')
    left.set_title('throughput (messages/s, higher is better)')
    right.bar(names, [r['latency_median'] * 1e3 for r in results],
              color='#dd8452')
    right.set_title('call latency p50 (ms, lower is better)')
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, format='png', dpi=100)
    plt.close(fig)
