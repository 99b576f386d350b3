"""Node consume throughput end to end on memory://, pidbox vs kombu Node.

One round publishes MESSAGES copies of a case to the node's queue (not
timed), then times the node draining them.  memory:// base64-encodes bodies
by default; the ``raw`` variant sets ``body_encoding=None`` so the transport's
own decoding does not hide the node's share of the work.
"""

from __future__ import annotations

import pytest

from pidbox import bench

MESSAGES = 200

CASES = [
    pytest.param(case, serializer, route,
                 id=f'{case}{"" if route else "-stock"}-{serializer}')
    for serializer in bench.SERIALIZERS
    for case in ('ping_other', 'revoke35k_other', 'glob_nomatch')
    for route in ((True, False) if case in bench.STOCK_CASES else (True,))
]


@pytest.mark.parametrize('transport', ['base64', 'raw'])
@pytest.mark.parametrize('case,serializer,route', CASES)
def test_memory_drain(benchmark, impl, case, serializer, route, transport):
    raws = [bench.encode(bench.make_request(case), serializer, route)] * \
        MESSAGES
    options = {} if transport == 'base64' else {'body_encoding': None}
    drain = bench.DrainBench(impl, raws, 'memory://',
                             transport_options=options)
    try:
        drain.fill()
        drain.drain()    # warm up
        benchmark.group = (f'memory:// {transport} {case}'
                           f'{"" if route else "-stock"} {serializer} '
                           f'x{MESSAGES}')
        benchmark.pedantic(drain.drain, setup=drain.fill, rounds=8)
    finally:
        drain.close()
