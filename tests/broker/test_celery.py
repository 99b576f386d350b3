"""Real Celery workers on pidbox, without monkeypatching.

Per broker (Redis, RabbitMQ) one stock worker and one worker whose app says
``control='pidbox.contrib.celery:Control'`` run as subprocesses
(``celery -A celery_testapp worker --pool=solo``) in one cluster (the same
control namespace).  The ``celery`` CLI and ``app.control`` drive them.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import uuid
from time import monotonic

import pytest

import pidbox
from brokerlib import (
    HERE, connect, require, subprocess_env, tail, terminate, unique,
)
from celery_testapp import make_app

pytestmark = pytest.mark.broker

WORKER_READY_DEADLINE = 90.0
CLI_DEADLINE = 120.0
TIMEOUT = 20.0   # reply timeout for calls that name their destinations


class Worker:
    def __init__(self, name, control, proc, log_path):
        self.name = name
        self.control = control
        self.proc = proc
        self.log_path = log_path


class CeleryCluster:
    def __init__(self, broker_name, url, namespace, workers):
        self.broker_name = broker_name
        self.url = url
        self.namespace = namespace
        self.workers = {w.control: w for w in workers}
        self.pidbox = self.workers['pidbox'].name
        self.stock = self.workers['stock'].name

    def env(self, control):
        return subprocess_env(PIDBOX_CELERY_BROKER=self.url,
                              PIDBOX_CELERY_CONTROL=control,
                              PIDBOX_CELERY_NAMESPACE=self.namespace)

    def app(self, control='pidbox'):
        return make_app(self.url, control, self.namespace)

    def cli(self, control, *args):
        """Run ``celery -A celery_testapp <args> --json``: ``{node: reply}``."""
        cmd = [sys.executable, '-m', 'celery', '-A', 'celery_testapp',
               *args, '--json']
        done = subprocess.run(cmd, cwd=HERE, env=self.env(control),
                              capture_output=True, text=True,
                              timeout=CLI_DEADLINE)
        assert done.returncode == 0, (cmd, done.stdout, done.stderr)
        lines = [line for line in done.stdout.splitlines() if line.strip()]
        assert lines, (cmd, done.stdout, done.stderr)
        replies = json.loads(lines[-1])
        if isinstance(replies, list):  # `celery control` prints the list
            merged = {}
            for reply in replies:
                assert not set(reply) & set(merged), replies
                merged.update(reply)
            return merged
        return replies

    def logs(self):
        return '\n'.join(f'--- {w.name} ({w.control}) ---\n'
                         f'{tail(w.log_path)}'
                         for w in self.workers.values())


def assert_revoked_ok(reply, task_id):
    # Celery formats the set of ids: "tasks {'<id>'} flagged as revoked"
    assert set(reply) == {'ok'}, reply
    assert 'flagged as revoked' in reply['ok'] and task_id in reply['ok']


def _wait_for_workers(cluster):
    app = cluster.app('stock')
    pending = {w.name for w in cluster.workers.values()}
    end = monotonic() + WORKER_READY_DEADLINE
    try:
        while pending:
            dead = [w.name for w in cluster.workers.values()
                    if w.proc.poll() is not None]
            if dead:
                pytest.fail(f'celery workers exited: {dead}\n'
                            f'{cluster.logs()}')
            if monotonic() > end:
                pytest.fail(f'celery workers never answered ping within '
                            f'{WORKER_READY_DEADLINE}s: {sorted(pending)}\n'
                            f'{cluster.logs()}')
            for reply in app.control.ping(sorted(pending), timeout=1.0):
                pending.difference_update(reply)
    finally:
        app.close()


@pytest.fixture(scope='module', params=['redis', 'amqp'])
def celery_cluster(request, tmp_path_factory):
    url = require(request.param)
    namespace = unique('celery')
    host = socket.gethostname()
    logs = tmp_path_factory.mktemp(f'celery-{request.param}')
    tag = uuid.uuid4().hex[:8]
    workers = []
    try:
        for control in ('pidbox', 'stock'):
            name = f'{control}-{tag}@{host}'
            log_path = logs / f'{control}.log'
            env = subprocess_env(PIDBOX_CELERY_BROKER=url,
                                 PIDBOX_CELERY_CONTROL=control,
                                 PIDBOX_CELERY_NAMESPACE=namespace)
            with open(log_path, 'wb') as log:
                proc = subprocess.Popen(
                    [sys.executable, '-m', 'celery', '-A', 'celery_testapp',
                     'worker', '--pool=solo', '-n', f'{control}-{tag}@%h',
                     '--without-heartbeat', '--without-gossip',
                     '--without-mingle', '-l', 'info'],
                    cwd=HERE, env=env, stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True)
            workers.append(Worker(name, control, proc, log_path))
        cluster = CeleryCluster(request.param, url, namespace, workers)
        _wait_for_workers(cluster)
        yield cluster
    finally:
        terminate(*(worker.proc for worker in workers))


def test_workers_run_the_configured_mailbox(celery_cluster):
    c = celery_cluster
    app = c.app('pidbox')
    try:
        replies = app.control.broadcast('mailbox_impl', reply=True,
                                        destination=[c.pidbox, c.stock],
                                        timeout=TIMEOUT)
    finally:
        app.close()
    merged = {k: v for r in replies for k, v in r.items()}
    assert merged == {
        c.pidbox: {'mailbox': 'pidbox.mailbox', 'node': 'pidbox.node'},
        c.stock: {'mailbox': 'kombu.pidbox', 'node': 'kombu.pidbox'},
    }


@pytest.mark.parametrize('client', ['pidbox', 'stock'])
def test_cli_against_pidbox_worker(celery_cluster, client):
    """`celery inspect`/`celery control` from either kind of client."""
    c = celery_cluster
    w = c.pidbox
    t = str(TIMEOUT)
    assert c.cli(client, 'inspect', 'ping', '-d', w, '-t', t) == {
        w: {'ok': 'pong'}}
    stats = c.cli(client, 'inspect', 'stats', '-d', w, '-t', t)
    assert set(stats) == {w}
    assert stats[w]['pid'] == c.workers['pidbox'].proc.pid
    assert stats[w]['pool']['implementation'].endswith(':TaskPool')
    assert c.cli(client, 'control', 'rate_limit', 'celery_testapp.add',
                 '10/m', '-d', w, '-t', t) == {
        w: {'ok': 'new rate limit set successfully'}}
    task_id = str(uuid.uuid4())
    replies = c.cli(client, 'control', 'revoke', task_id, '-d', w, '-t', t)
    assert list(replies) == [w]
    assert_revoked_ok(replies[w], task_id)
    revoked = c.cli(client, 'inspect', 'revoked', '-d', w, '-t', t)
    assert task_id in revoked[w]


def test_app_control_against_pidbox_worker(celery_cluster):
    c = celery_cluster
    w = c.pidbox
    app = c.app('pidbox')
    try:
        assert isinstance(app.control.mailbox, pidbox.Mailbox)
        assert app.control.ping([w], timeout=TIMEOUT) == [{w: {'ok': 'pong'}}]
        stats = app.control.inspect([w], timeout=TIMEOUT).stats()
        assert stats[w]['pid'] == c.workers['pidbox'].proc.pid
        assert app.control.rate_limit(
            'celery_testapp.add', '5/s', destination=[w], reply=True,
            timeout=TIMEOUT) == [
            {w: {'ok': 'new rate limit set successfully'}}]
        task_id = str(uuid.uuid4())
        replies = app.control.revoke(task_id, destination=[w], reply=True,
                                     timeout=TIMEOUT)
        assert [list(r) for r in replies] == [[w]]
        assert_revoked_ok(replies[0][w], task_id)
        revoked = app.control.inspect([w], timeout=TIMEOUT).revoked()
        assert task_id in revoked[w]
        # an unknown command is an error reply, and the worker carries on
        assert app.control.broadcast(
            'no_such_command', destination=[w], reply=True,
            timeout=TIMEOUT) == [
            {w: {'error': "KeyError('no_such_command')"}}]
        assert app.control.ping([w], timeout=TIMEOUT) == [{w: {'ok': 'pong'}}]
    finally:
        app.close()


def test_pidbox_client_pings_stock_worker(celery_cluster):
    c = celery_cluster
    mailbox = pidbox.Mailbox(c.namespace, type='fanout')
    with connect(c.url) as conn:
        replies = mailbox(conn).call([c.stock], 'ping', timeout=TIMEOUT)
    assert replies == [{c.stock: {'ok': 'pong'}}]


@pytest.mark.parametrize('client', ['pidbox', 'stock'])
def test_mixed_cluster_answers_one_multi_call(celery_cluster, client):
    c = celery_cluster
    both = {c.pidbox: {'ok': 'pong'}, c.stock: {'ok': 'pong'}}
    app = c.app(client)
    try:
        replies = app.control.broadcast('ping', reply=True, limit=2,
                                        timeout=TIMEOUT)
        assert {k: v for r in replies for k, v in r.items()} == both
        assert len(replies) == 2
        # and without a limit: the call lasts its timeout, replies are
        # still exactly one per worker
        replies = app.control.ping(timeout=2.0)
        assert {k: v for r in replies for k, v in r.items()} == both
        assert len(replies) == 2
    finally:
        app.close()
    mailbox = pidbox.Mailbox(c.namespace, type='fanout')
    with connect(c.url) as conn:
        replies = mailbox(conn).multi_call('ping', timeout=TIMEOUT, limit=2)
    assert {k: v for r in replies for k, v in r.items()} == both
