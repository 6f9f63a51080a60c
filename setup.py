"""Build script for the compiled core.

Set ``GRAPHEME_BOUNDSCHECK=1`` when building to turn Cython's bounds checking,
negative-index wrapping and memoryview initialisation checks back on (slow;
for debugging a kernel).
"""
import os

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("GRAPHEME_BOUNDSCHECK", "0") not in ("", "0")

directives = {
    "language_level": 3,
    "embedsignature": True,
    "binding": True,
    "boundscheck": DEBUG,
    "wraparound": DEBUG,
    "initializedcheck": DEBUG,
    "cdivision": not DEBUG,
}

# One extension per topic; they share _types.pxd (cimported, no textual include).
extensions = [
    Extension(
        f"grapheme.{name}",
        [f"grapheme/{name}.pyx"],
        include_dirs=[np.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        extra_compile_args=["-O3"] if os.name != "nt" else [],
    )
    for name in ("_core", "_relax", "_transport")
]

setup(ext_modules=cythonize(extensions, compiler_directives=directives))
