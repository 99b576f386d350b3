"""Which dispatch core is active, and that a normal install compiled it."""

import os

import pidbox
from pidbox import _core


def test_implementation_matches_environment():
    forced_pure = os.environ.get('PIDBOX_NO_EXTENSIONS', '') not in ('', '0')
    if forced_pure:
        assert pidbox.IMPLEMENTATION == 'python'
        assert pidbox.Node.dispatch_core is _core.pure
    else:
        assert pidbox.IMPLEMENTATION == 'cython', (
            'the compiled core did not load: install with `pip install .` '
            '(a C compiler is needed) or set PIDBOX_NO_EXTENSIONS=1')
        assert pidbox.Node.dispatch_core is _core.compiled
        assert _core.compiled.__file__.endswith(('.so', '.pyd'))


def test_twins_have_different_importable_names():
    assert _core.pure.__name__ == 'pidbox._dispatch_py'
    if _core.compiled is not None:
        assert _core.compiled.__name__ == 'pidbox._dispatch'
