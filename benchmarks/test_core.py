"""Raw message bytes in, decision (and handler result) out: no broker.

pidbox: the callable a pidbox Node's consumer calls for a raw message.
kombu: ``kombu.serialization.loads`` of the body, then
``kombu.pidbox.Node.handle_message``.  Reply publishing is stubbed for all.
"""

from __future__ import annotations

import pytest

from pidbox import bench

pytestmark = pytest.mark.benchmark(max_time=1.0, min_rounds=5)

CASES = [
    pytest.param(case, serializer, route,
                 id=f'{case}{"" if route else "-stock"}-{serializer}')
    for serializer in bench.SERIALIZERS
    for case in bench.CASES
    for route in ((True, False) if case in bench.STOCK_CASES else (True,))
]

FOR_ME = ('pcre_match', 'call_me')


@pytest.mark.parametrize('case,serializer,route', CASES)
def test_core(benchmark, impl, case, serializer, route):
    request = bench.make_request(case)
    raw = bench.encode(request, serializer, route)
    run = bench.core_runner(impl, raw)
    expected = None
    if case in FOR_ME:
        expected = bench.handlers()[request['method']](
            None, **request['arguments'])
    assert run() == expected
    benchmark.group = (f'core {case}{"" if route else "-stock"} '
                       f'{serializer} {len(raw.body) // 1024}KB')
    benchmark.extra_info['bytes'] = len(raw.body)
    benchmark(run)
