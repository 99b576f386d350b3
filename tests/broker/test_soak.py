"""Soak: many node processes, many mixed commands, nothing lost or doubled.

On each real broker, ``PIDBOX_SOAK_NODES`` (default 20) ``python -m
pidbox.service`` processes serve one fanout mailbox, and the test sends
``PIDBOX_SOAK_COMMANDS`` (default 100,000) ``count`` commands mixed across
cast / call / multi_call and destinations (everyone, one node, several
nodes, glob patterns).  Every node counts what it ran; one call at the end
collects the counts, which must equal what was addressed to each node: zero
lost, zero duplicated, zero misdelivered.  Node memory must stay flat
(``/proc/<pid>/status`` after warm-up and at the end).

Also here: one unbound Mailbox used from 8 threads at once on the real
brokers, each thread with its own connection.

Subprocesses run from a scratch directory without the repository root on
``PYTHONPATH``, so they import the installed pidbox.
"""

from __future__ import annotations

import os
import random
import threading
from collections import Counter
from fnmatch import fnmatch
from time import monotonic

import pytest

import pidbox
from brokerlib import (
    connect, merge, require, start_services, tail, terminate, unique,
    wait_for_fleet,
)

pytestmark = pytest.mark.broker

NODES = int(os.environ.get('PIDBOX_SOAK_NODES', '20'))
COMMANDS = int(os.environ.get('PIDBOX_SOAK_COMMANDS', '100000'))
READY_DEADLINE = 120.0
TIMEOUT = 60.0          # per call; calls normally take milliseconds
#: casts carry expires = now + this (cast() would give 1 s; see test_faults)
CAST_EXPIRES = 600.0
#: a multi_call to every node every BARRIER commands keeps the nodes from
#: falling minutes behind (Redis drops pub/sub clients whose output buffer
#: overflows)
BARRIER = 500


def proc_status(pid, field):
    try:
        with open(f'/proc/{pid}/status') as f:
            for line in f:
                if line.startswith(field + ':'):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class Fleet:
    def __init__(self, name, url, namespace, hostnames, procs):
        self.name = name
        self.url = url
        self.namespace = namespace
        self.hostnames = hostnames
        self.procs = procs

    def mailbox(self):
        return pidbox.Mailbox(self.namespace, type='fanout')

    def rss(self, field='VmRSS'):
        return {h: proc_status(p.pid, field)
                for h, p in zip(self.hostnames, self.procs)}

    def logs(self):
        return '\n'.join(f'--- {h} ---\n{tail(p.log_path, 1500)}'
                         for h, p in zip(self.hostnames, self.procs)
                         if p.poll() is not None)


@pytest.fixture(scope='module', params=['redis', 'amqp'])
def fleet(request, tmp_path_factory):
    url = require(request.param)
    namespace = unique('soak')
    workdir = tmp_path_factory.mktemp(f'soak-{request.param}')
    hostnames = [f'node{i:03d}.{namespace}' for i in range(NODES)]
    procs = []
    try:
        start_services(procs, url, namespace, hostnames, workdir,
                       cwd=workdir)
        fleet = Fleet(request.param, url, namespace, hostnames, procs)
        wait_for_fleet(fleet, READY_DEADLINE)
        yield fleet
    finally:
        terminate(*procs)


def glob_patterns(hostnames):
    """Glob patterns that address 1, a few, half and all of the nodes."""
    first = hostnames[0]
    return ['*', 'node00*', 'node01*', f'{first}', 'node0[0-1][02468].*',
            '*3.*', 'node00[0-4].*', 'nomatch-*']


class Plan:
    """Addressed nodes for each kind of destination, chosen at random."""

    def __init__(self, hostnames, seed):
        self.hostnames = hostnames
        self.rng = random.Random(seed)
        self.patterns = [(p, [h for h in hostnames if fnmatch(h, p)])
                         for p in glob_patterns(hostnames)]

    def destination(self):
        """(destination list or None, pattern or None, addressed hosts)."""
        rng = self.rng
        roll = rng.random()
        if roll < 0.10:
            return None, None, list(self.hostnames)
        if roll < 0.50:
            host = rng.choice(self.hostnames)
            return [host], None, [host]
        if roll < 0.80:
            hosts = rng.sample(self.hostnames,
                               rng.randint(2, min(5, len(self.hostnames))))
            return hosts, None, hosts
        pattern, hosts = rng.choice(self.patterns)
        return None, pattern, hosts


def test_soak_every_command_counted_once_at_every_addressed_node(fleet):
    tag = unique('soak')
    plan = Plan(fleet.hostnames, seed=20240)
    expected = Counter()
    kinds = Counter()
    failures = []
    warm_rss = end_rss = None
    warmup = max(1, COMMANDS // 10)
    started = monotonic()
    with connect(fleet.url) as conn:
        client = fleet.mailbox()(conn)
        for i in range(COMMANDS):
            if i == warmup:
                warm_rss = fleet.rss()
            destination, pattern, hosts = plan.destination()
            roll = plan.rng.random()
            args = {'tag': tag}
            if i % BARRIER == BARRIER - 1:
                kind = 'barrier'
                destination, pattern, hosts = None, None, fleet.hostnames
                replies = client.multi_call('count', args, timeout=TIMEOUT,
                                            limit=len(hosts))
            elif roll < 0.92:
                kind = 'cast'
                client._broadcast('count', args, destination, reply=False,
                                  timeout=CAST_EXPIRES, pattern=pattern,
                                  matcher=pattern and 'glob')
                replies = None
            elif roll < 0.97 and destination:
                kind = 'call'
                replies = client.call(destination, 'count', args,
                                      timeout=TIMEOUT)
            else:
                kind = 'multi_call'
                if not hosts:   # a pattern that matches nobody: no wait
                    replies = client._broadcast(
                        'count', args, destination, reply=True, timeout=0.2,
                        pattern=pattern, matcher=pattern and 'glob')
                else:
                    replies = client._broadcast(
                        'count', args, destination, reply=True,
                        timeout=TIMEOUT, limit=len(hosts), pattern=pattern,
                        matcher=pattern and 'glob')
            kinds[kind] += 1
            expected.update(hosts)
            if replies is not None:
                got = merge(replies)
                if set(got) != set(hosts) or len(replies) != len(hosts):
                    failures.append((i, kind, destination, pattern,
                                     sorted(hosts), replies))
                elif any(type(v) is not int or v > expected[h]
                         for h, v in got.items()):
                    failures.append((i, kind, 'count ahead', got))
        published = monotonic() - started
        counts = merge(client.multi_call('count', timeout=TIMEOUT,
                                         limit=len(fleet.hostnames)))
    elapsed = monotonic() - started
    end_rss = fleet.rss()
    hwm = fleet.rss('VmHWM')
    deliveries = sum(expected.values())
    assert all(p.poll() is None for p in fleet.procs), fleet.logs()
    print(f'\n{fleet.name}: {COMMANDS:,} commands ({dict(kinds)}) to '
          f'{NODES} nodes = {deliveries:,} deliveries counted in '
          f'{elapsed:.1f}s (sent in {published:.1f}s; '
          f'{COMMANDS / elapsed:,.0f} commands/s, '
          f'{deliveries / elapsed:,.0f} deliveries/s); node RSS after '
          f'warm-up {min(warm_rss.values()) / 1024:.1f}-'
          f'{max(warm_rss.values()) / 1024:.1f} MB, at the end '
          f'{min(end_rss.values()) / 1024:.1f}-'
          f'{max(end_rss.values()) / 1024:.1f} MB, peak '
          f'{max(hwm.values()) / 1024:.1f} MB')
    assert not failures, failures[:5]
    assert set(counts) == set(fleet.hostnames)
    got = {h: c.get(tag, 0) for h, c in counts.items()}
    want = {h: expected[h] for h in fleet.hostnames}
    lost = {h: want[h] - got[h] for h in want if got[h] < want[h]}
    extra = {h: got[h] - want[h] for h in want if got[h] > want[h]}
    assert not lost, f'lost commands per node: {lost}'
    assert not extra, f'duplicated or misdelivered per node: {extra}'
    # memory flat: a node may grow a little (allocator, caches), not with
    # the number of messages
    growth = {h: (end_rss[h] - warm_rss[h]) / 1024 for h in fleet.hostnames}
    assert max(growth.values()) < 16.0, growth


def test_eight_threads_one_unbound_mailbox(fleet):
    """Each thread binds the shared Mailbox to its own connection."""
    mailbox = fleet.mailbox()
    threads_n, calls = 8, 50
    hosts = fleet.hostnames
    wrong = []
    barrier = threading.Barrier(threads_n)

    def caller(index):
        rng = random.Random(index)
        try:
            with connect(fleet.url) as conn:
                bound = mailbox(conn)
                barrier.wait(30)
                for n in range(calls):
                    value = f't{index}-{n}'
                    if n % 10 == 9:
                        replies = bound.multi_call(
                            'echo', {'value': value}, timeout=TIMEOUT,
                            limit=len(hosts))
                        want = {h: value for h in hosts}
                    else:
                        chosen = rng.sample(hosts, rng.randint(1, 3))
                        replies = bound.call(chosen, 'echo',
                                             {'value': value},
                                             timeout=TIMEOUT)
                        want = {h: value for h in chosen}
                    if len(replies) != len(want) or merge(replies) != want:
                        wrong.append((index, n, want, replies))
        except Exception as exc:  # noqa: BLE001 - reported below
            wrong.append((index, repr(exc)))

    threads = [threading.Thread(target=caller, args=(i,), daemon=True)
               for i in range(threads_n)]
    started = monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT * calls)
    assert not any(t.is_alive() for t in threads), 'a caller hung'
    print(f'\n{fleet.name}: {threads_n} threads x {calls} calls in '
          f'{monotonic() - started:.1f}s')
    assert not wrong, wrong[:3]
    assert mailbox.unclaimed.reply_count == 0
