"""Fixtures for the integration tests against real brokers on 127.0.0.1.

Every test here is marked ``broker``.  Broker URLs come from
``PIDBOX_AMQP_URL`` / ``PIDBOX_REDIS_URL``; an unreachable broker skips its
tests locally (naming the broker) and fails them when ``CI`` is set.
"""

from __future__ import annotations

import subprocess

import pytest

from brokerlib import HERE, NodeThread, require, subprocess_env, terminate


@pytest.fixture
def broker(request):
    """``(name, url)`` for the parametrized broker name; skip/fail if down."""
    name = request.param
    return name, require(name)


@pytest.fixture
def amqp_url():
    return require('amqp')


@pytest.fixture
def redis_url():
    return require('redis')


@pytest.fixture
def node_threads():
    """Start :class:`NodeThread` s; stop them after, and report their errors."""
    started = []

    def start(url, mailbox, hostnames):
        threads = [NodeThread(url, mailbox, h) for h in hostnames]
        for thread in threads:
            thread.start()
            started.append(thread)
        for thread in threads:
            assert thread.listening.wait(30), f'{thread.name} never listened'
            if thread.error is not None:
                raise thread.error
        return threads

    yield start
    for thread in started:
        thread.stop()
    errors = [(t.hostname, t.error) for t in started if t.error is not None]
    alive = [t.hostname for t in started if t.is_alive()]
    assert not errors, f'node threads failed: {errors}'
    assert not alive, f'node threads did not stop: {alive}'


@pytest.fixture
def processes():
    """Start subprocesses in their own process groups; always end them."""
    started: list[subprocess.Popen] = []

    def spawn(args, log_path=None, env=None, **kwargs):
        log = None
        if log_path is not None:
            log = open(log_path, 'wb')  # noqa: SIM115 - closed below
            kwargs.setdefault('stdout', log)
            kwargs.setdefault('stderr', subprocess.STDOUT)
        try:
            kwargs.setdefault('cwd', HERE)  # not the source tree (see env)
            proc = subprocess.Popen(
                args, start_new_session=True,
                env=subprocess_env() if env is None else env, **kwargs)
        finally:
            if log is not None:
                log.close()
        proc.log_path = log_path
        started.append(proc)
        return proc

    yield spawn
    terminate(*started)
