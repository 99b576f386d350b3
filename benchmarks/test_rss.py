"""One million messages through a node leave its resident memory flat.

Runs the realistic mix (for this node, for others, patterns, a 35 KB revoke,
a few malformed) through the handler ``Node.listen()`` installs, and reads
the process's resident set size after a warm-up and at the end.

    pytest benchmarks/test_rss.py -s -p no:cacheprovider
    PIDBOX_RSS_MESSAGES=200000 pytest benchmarks/test_rss.py -s
"""

from __future__ import annotations

import gc
import logging
import os
import time

import pytest

from pidbox import bench

MESSAGES = int(os.environ.get('PIDBOX_RSS_MESSAGES', 1_000_000))


def rss_kib() -> int:
    with open('/proc/self/status') as status:
        for line in status:
            if line.startswith('VmRSS:'):
                return int(line.split()[1])
    raise RuntimeError('no VmRSS in /proc/self/status')


def mix():
    raws = []
    for case in bench.CASES:
        for serializer in ('json', 'msgpack'):
            request = bench.make_request(case)
            raws.append(bench.encode(request, serializer, route=True))
            raws.append(bench.encode(request, serializer, route=False))
    raws.append(bench.RawMessage(b'{"method": 5}', 'application/json',
                                 'utf-8', {}))
    raws.append(bench.RawMessage(b'\xff', 'application/json', 'utf-8', {}))
    return raws


@pytest.mark.parametrize('impl', ['compiled', 'pure'])
def test_resident_memory_stays_flat(impl, capsys):
    try:
        runners = [bench.core_runner(impl, raw) for raw in mix()]
    except RuntimeError as exc:  # compiled core not loaded
        pytest.skip(str(exc))
    logging.getLogger('pidbox').setLevel(logging.CRITICAL)  # bad ones log
    try:
        warmup = max(len(runners), MESSAGES // 10)
        for i in range(warmup):
            runners[i % len(runners)]()
        gc.collect()
        before = rss_kib()
        started = time.perf_counter()
        for i in range(MESSAGES):
            runners[i % len(runners)]()
        elapsed = time.perf_counter() - started
        gc.collect()
        after = rss_kib()
    finally:
        logging.getLogger('pidbox').setLevel(logging.NOTSET)
    with capsys.disabled():
        print(f'\n{impl}: {MESSAGES} messages in {elapsed:.1f} s, '
              f'RSS {before} KiB after warm-up, {after} KiB at the end '
              f'({after - before:+d} KiB)')
    assert after - before < 4096, (before, after)
