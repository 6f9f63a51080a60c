"""Build script for the compiled core.

Set ``GRAPHEME_BOUNDSCHECK=1`` when building to turn Cython's bounds checking,
negative-index wrapping and memoryview initialisation checks back on (slow;
for debugging a kernel).

OpenMP: the kernels' loops over pairs and rows run on several threads when
the C compiler accepts ``-fopenmp`` (checked by compiling and linking a tiny
OpenMP program, as scikit-learn's build does); otherwise, or with
``GRAPHEME_OPENMP=0``, they build serial, with the same results.
``grapheme.openmp_enabled()`` says which build is installed.
"""
import os
import shutil
import sys
import tempfile
import textwrap

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

_OPENMP_TEST = textwrap.dedent("""\
    #include <omp.h>
    int main(void) {
        int n = 0;
        #pragma omp parallel reduction(+: n)
        n += 1;
        return n == omp_get_max_threads() ? 0 : 1;
    }
    """)


def openmp_flags():
    """``-fopenmp`` (compile and link) if the compiler builds and links an
    OpenMP program with it, else None. MSVC spells it ``/openmp``."""
    if os.environ.get("GRAPHEME_OPENMP", "1") in ("", "0"):
        return None
    from setuptools._distutils.ccompiler import new_compiler
    from setuptools._distutils.sysconfig import customize_compiler
    from setuptools._distutils.errors import CompileError, LinkError

    compiler = new_compiler()
    customize_compiler(compiler)
    flag = "/openmp" if compiler.compiler_type == "msvc" else "-fopenmp"
    tmp = tempfile.mkdtemp(prefix="grapheme-openmp-")
    try:
        src = os.path.join(tmp, "check_openmp.c")
        with open(src, "w") as f:
            f.write(_OPENMP_TEST)
        objects = compiler.compile([src], output_dir=tmp, extra_postargs=[flag])
        compiler.link_executable(objects, os.path.join(tmp, "check_openmp"),
                                 extra_postargs=[] if flag == "/openmp" else [flag])
    except (CompileError, LinkError, OSError) as exc:
        print(f"grapheme: building without OpenMP ({flag} failed: {exc})", file=sys.stderr)
        return None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return flag


OPENMP = openmp_flags()
compile_args = ["-O3"] if os.name != "nt" else []
link_args = []
if OPENMP is not None:
    compile_args.append(OPENMP)
    if OPENMP != "/openmp":
        link_args.append(OPENMP)

# One extension per topic; they share _types.pxd (cimported, no textual include).
extensions = [
    Extension(
        f"grapheme.{name}",
        [f"grapheme/{name}.pyx"],
        include_dirs=[np.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        extra_compile_args=compile_args,
        extra_link_args=link_args,
    )
    for name in ("_core", "_relax", "_transport", "_products")
]

setup(ext_modules=cythonize(extensions, compiler_directives=directives))
