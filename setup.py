"""Build the compiled dispatch core (src/_dispatch.pyx -> pidbox._dispatch).

A compiler failure fails the build: there is no silent pure fallback.  Set
PIDBOX_NO_EXTENSIONS=1 to build and install the pure-Python package on
purpose.  PIDBOX_CYTHON_TRACE=1 builds with line tracing (for coverage of the
.pyx; much slower, never for release).
"""

import os

from setuptools import Extension, setup

NO_EXTENSIONS = os.environ.get('PIDBOX_NO_EXTENSIONS', '') not in ('', '0')
TRACE = os.environ.get('PIDBOX_CYTHON_TRACE', '') not in ('', '0')


def extensions():
    if NO_EXTENSIONS:
        return []
    from Cython.Build import cythonize

    macros = [('CYTHON_TRACE', '1')] if TRACE else []
    return cythonize(
        [Extension('pidbox._dispatch', ['src/_dispatch.pyx'],
                   define_macros=macros)],
        compiler_directives={
            'language_level': 3,
            'embedsignature': True,
            'linetrace': TRACE,
        },
    )


setup(ext_modules=extensions())
