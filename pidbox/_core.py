"""Pick the dispatch core: the compiled extension, or its pure-Python twin.

``PIDBOX_NO_EXTENSIONS`` set to anything but ``0`` (or an interpreter other
than CPython) selects the twin.  The choice is made once, at import.
"""

from __future__ import annotations

import os
import platform

from . import _dispatch_py as pure

__all__ = ('NO_EXTENSIONS', 'IMPLEMENTATION', 'core', 'compiled', 'pure')

NO_EXTENSIONS = (
    os.environ.get('PIDBOX_NO_EXTENSIONS', '') not in ('', '0') or
    platform.python_implementation() != 'CPython'
)

compiled = None
if not NO_EXTENSIONS:
    try:
        from . import _dispatch as compiled
    except ImportError:  # a source tree that was never built
        compiled = None

#: The active dispatch core module.
core = pure if compiled is None else compiled
#: ``"cython"`` or ``"python"``: which core is active.
IMPLEMENTATION = 'python' if compiled is None else 'cython'
