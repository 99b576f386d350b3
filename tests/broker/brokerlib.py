"""Helpers for the integration tests against real brokers on 127.0.0.1.

Broker URLs come from ``PIDBOX_AMQP_URL`` and ``PIDBOX_REDIS_URL``.  A test
whose broker cannot be reached is skipped, naming the broker, except when
``CI`` is set: then it fails, so CI never passes without having talked to
RabbitMQ and Redis.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import uuid
from collections import Counter
from pathlib import Path
from time import monotonic, sleep

import pytest
from kombu import Connection

import pidbox
from pidbox.service import example_handlers

AMQP_URL = os.environ.get('PIDBOX_AMQP_URL',
                          'amqp://guest:guest@127.0.0.1:5672//')
REDIS_URL = os.environ.get('PIDBOX_REDIS_URL', 'redis://127.0.0.1:6379/0')
MEMORY_URL = 'memory://'

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]

#: transport options for every test connection: fast polling on memory://.
TRANSPORT_OPTIONS = {'polling_interval': 0.01}


def in_ci() -> bool:
    return os.environ.get('CI', '').strip().lower() not in ('', '0', 'false',
                                                            'no')


def unavailable(what: str, detail: str):
    """Skip locally, fail in CI, with a reason that names ``what``."""
    reason = f'{what} not available: {detail}'
    if in_ci():
        pytest.fail(f'{reason} (CI is set, so broker tests must run)',
                    pytrace=False)
    pytest.skip(reason)


_reachability: dict[str, str | None] = {}


def _probe(url: str) -> str | None:
    """None when the broker at ``url`` answers, else why it does not."""
    if url not in _reachability:
        conn = Connection(url, connect_timeout=3)
        try:
            conn.ensure_connection(max_retries=1, timeout=5)
            conn.default_channel  # noqa: B018 - opens (and checks) a channel
            _reachability[url] = None
        except Exception as exc:  # noqa: BLE001 - any failure means "down"
            _reachability[url] = f'{exc!r}'
        finally:
            conn.release()
    return _reachability[url]


def require_broker(name: str, url: str) -> str:
    if name == 'memory':
        return url
    problem = _probe(url)
    if problem is not None:
        unavailable(f'{name} broker at {Connection(url).as_uri()}', problem)
    return url


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        unavailable(name, f'{name} is not on PATH')
    return path


BROKER_URLS = {'memory': MEMORY_URL, 'redis': REDIS_URL, 'amqp': AMQP_URL}
BROKER_LABELS = {'memory': 'memory', 'redis': 'Redis', 'amqp': 'RabbitMQ'}


def require(name: str) -> str:
    """The URL of broker ``name`` ('memory', 'redis', 'amqp'), if it answers."""
    return require_broker(BROKER_LABELS[name], BROKER_URLS[name])


def connect(url: str) -> Connection:
    return Connection(url, transport_options=dict(TRANSPORT_OPTIONS))


def unique(prefix: str = 'pbx') -> str:
    return f'{prefix}-{uuid.uuid4().hex[:12]}'


def mailbox_class(impl: str):
    if impl == 'kombu':
        from kombu.pidbox import Mailbox
        return Mailbox
    return pidbox.Mailbox


def serializer_opts(serializer: str) -> dict:
    accept = ['json'] if serializer == 'json' else ['json', serializer]
    return {'serializer': serializer, 'accept': accept}


# -- nodes in threads -------------------------------------------------------

class NodeThread(threading.Thread):
    """A node with its own connection, draining events until stopped."""

    def __init__(self, url, mailbox, hostname):
        super().__init__(name=f'node-{hostname}', daemon=True)
        self.url = url
        self.mailbox = mailbox
        self.hostname = hostname
        self.state = {'hostname': hostname, 'counts': Counter()}
        self.listening = threading.Event()
        self.stopping = threading.Event()
        self.error = None

    def run(self):
        try:
            with connect(self.url) as conn:
                node = self.mailbox(conn).Node(
                    self.hostname, state=self.state,
                    handlers=example_handlers())
                node.channel = conn.default_channel
                consumer = node.listen()
                self.listening.set()
                try:
                    while not self.stopping.is_set():
                        try:
                            conn.drain_events(timeout=0.1)
                        except socket.timeout:
                            pass
                finally:
                    consumer.cancel()
        except BaseException as exc:  # reported by the fixture that owns us
            self.error = exc
            self.listening.set()

    def stop(self):
        self.stopping.set()
        self.join(10)


def wait_answering(client, hostnames, deadline=60.0, logs=None):
    """Poll ``ping`` until every node in ``hostnames`` answers.

    ``client`` is a bound mailbox; fails naming the silent nodes, with what
    ``logs()`` returns (the nodes' output, say) when it is given.
    """
    pending = set(hostnames)
    end = monotonic() + deadline
    while pending:
        replies = client.call(sorted(pending), 'ping', timeout=1.0) or []
        for reply in replies:
            pending.difference_update(reply)
        if pending and monotonic() > end:
            pytest.fail(f'nodes never answered ping within {deadline}s: '
                        f'{sorted(pending)}' +
                        (f'\n{logs()}' if logs is not None else ''))
    return True


# -- subprocesses -----------------------------------------------------------

def subprocess_env(**extra) -> dict:
    """os.environ for a node or worker subprocess.

    Not the source tree: subprocesses must import the installed pidbox,
    whose compiled core a fresh clone's pidbox/ does not have; so the
    repository root comes off PYTHONPATH and this folder (the Celery test
    app) goes on it.  Start them with a cwd outside the root, too.
    """
    env = dict(os.environ)
    root = os.path.realpath(ROOT)
    path = [str(HERE)] + [
        p for p in env.get('PYTHONPATH', '').split(os.pathsep)
        if p and os.path.realpath(p) != root]
    env['PYTHONPATH'] = os.pathsep.join(path)
    env['PYTHONUNBUFFERED'] = '1'
    env.update({k: str(v) for k, v in extra.items()})
    return env


def wait_for_fleet(fleet, deadline: float) -> None:
    """Until every node of ``fleet`` answers ping (fail past ``deadline``)."""
    pending = set(fleet.hostnames)
    end = monotonic() + deadline
    with connect(fleet.url) as conn:
        client = fleet.mailbox()(conn)
        while pending:
            if any(p.poll() is not None for p in fleet.procs):
                pytest.fail(f'node processes exited:\n{fleet.logs()}')
            if monotonic() > end:
                pytest.fail(f'{len(pending)} of {len(fleet.hostnames)} nodes '
                            f'never answered within {deadline}s: '
                            f'{sorted(pending)[:5]}')
            for reply in client.call(sorted(pending), 'ping',
                                     timeout=2.0) or ():
                pending.difference_update(reply)


def _signal_group(proc, signum):
    try:
        os.killpg(proc.pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def terminate(*procs: subprocess.Popen, grace: float = 15.0) -> None:
    """Stop ``procs`` and their process groups: SIGTERM, then SIGKILL.

    All are signalled at once, so stopping N processes takes one grace
    period at most, not N.
    """
    for proc in procs:
        if proc.poll() is None:
            _signal_group(proc, signal.SIGTERM)
    end = monotonic() + grace
    for proc in procs:
        try:
            proc.wait(max(0.0, end - monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for proc in procs:
        _signal_group(proc, signal.SIGKILL)  # leftover children, too
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:  # pragma: no cover - a zombie
            pass


def service_args(broker_url, hostname, namespace, serializer='json',
                 impl='pidbox', type='fanout'):
    return [sys.executable, '-m', 'pidbox.service', '--broker', broker_url,
            '--hostname', hostname, '--namespace', namespace,
            '--type', type, '--serializer', serializer, '--impl', impl]


def start_services(procs, url, namespace, hostnames, log_dir, cwd=HERE,
                   impl_of=lambda index: 'pidbox') -> None:
    """Start a ``python -m pidbox.service`` process for each hostname.

    Each goes on ``procs`` as soon as it runs, so that the caller's
    ``terminate(*procs)`` also ends a fleet that failed half way through
    starting; its output goes to ``log_dir / f'{hostname}.log'``
    (``proc.log_path``).  ``impl_of(index)`` picks pidbox or kombu.
    """
    for index, hostname in enumerate(hostnames):
        log_path = log_dir / f'{hostname}.log'
        with open(log_path, 'wb') as log:
            proc = subprocess.Popen(
                service_args(url, hostname, namespace, impl=impl_of(index)),
                stdout=log, stderr=subprocess.STDOUT, cwd=str(cwd),
                env=subprocess_env(), start_new_session=True)
        proc.log_path = log_path
        procs.append(proc)


def tail(path, limit=4000) -> str:
    try:
        return Path(path).read_text(errors='replace')[-limit:]
    except OSError as exc:
        return f'<no log: {exc}>'


def poll(predicate, deadline, interval=0.25, message='condition'):
    """Call ``predicate`` until it returns truthy or ``deadline`` s pass."""
    end = monotonic() + deadline
    while True:
        result = predicate()
        if result:
            return result
        if monotonic() > end:
            pytest.fail(f'{message} not reached within {deadline}s')
        sleep(interval)


def merge(replies):
    """``[{host: value}, ...]`` -> ``{host: value}``, refusing duplicates."""
    merged = {}
    for reply in replies or ():
        for host, value in reply.items():
            assert host not in merged, f'two replies from {host}: {replies}'
            merged[host] = value
    return merged
