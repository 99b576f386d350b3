"""Benchmarks: every case runs compiled, pure and kombu in one run.

The ``impl`` fixture is the one switch; each test puts its three runs in one
pytest-benchmark group (``benchmark.group``), and the terminal summary prints
the compiled/kombu and compiled/pure ratios of the medians per group.

    /work/venv/bin/pytest benchmarks -p no:cacheprovider -m "not broker"
"""

from __future__ import annotations

import pytest

from pidbox import _core
from pidbox.bench import IMPLEMENTATIONS

IMPLS = [
    pytest.param(name, id=name, marks=pytest.mark.skipif(
        name == 'compiled' and _core.compiled is None,
        reason='compiled core not loaded')) if name == 'compiled'
    else pytest.param(name, id=name)
    for name in IMPLEMENTATIONS
]


def pytest_configure(config):
    config.addinivalue_line(
        'markers', 'broker: talks to a real RabbitMQ or Redis on 127.0.0.1')


@pytest.fixture(params=IMPLS)
def impl(request):
    """``compiled``, ``pure`` or ``kombu``: which node handles the input."""
    return request.param


def _medians(config):
    session = getattr(config, '_benchmarksession', None)
    groups = {}
    for bench in getattr(session, 'benchmarks', None) or ():
        stats = getattr(bench, 'stats', None)
        impl = (getattr(bench, 'params', None) or {}).get('impl')
        if stats is None or impl is None or not bench.group:
            continue
        groups.setdefault(bench.group, {})[impl] = stats.median
    return groups


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    groups = _medians(config)
    if not groups:
        return
    write = terminalreporter.write_line
    terminalreporter.section('pidbox: ratios of medians (higher: compiled wins)')
    write(f'{"case":<44} {"compiled":>11} {"pure":>11} {"kombu":>11} '
          f'{"c/kombu":>8} {"c/pure":>7}')
    for group in sorted(groups):
        m = groups[group]
        c, p, k = m.get('compiled'), m.get('pure'), m.get('kombu')

        def fmt(value):
            if value is None:
                return '-'
            return (f'{value * 1e6:.2f}us' if value < 1e-3
                    else f'{value * 1e3:.2f}ms')

        def ratio(other):
            return f'{other / c:.2f}x' if c and other else '-'
        write(f'{group:<44} {fmt(c):>11} {fmt(p):>11} {fmt(k):>11} '
              f'{ratio(k):>8} {ratio(p):>7}')
