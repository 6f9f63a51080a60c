"""One thread pool: while grapheme's OpenMP kernels run the encoder's
products, BLAS runs on one thread.

numpy's BLAS (OpenBLAS with its own pthreads, MKL, BLIS) and grapheme's
compiled kernels (OpenMP) keep separate thread pools, and the idle threads
of each keep spinning for a while after every call. A step that alternates
the two (the encoder's products, then the neighbour sums, the morph, the
loss) hands each pool's cores to the other's spinning threads. Measured on
2 idle cores, a training step with a 2-layer encoder at d = 64 on 256 pairs
(``bench/bench_train.py``, ``EncoderStepSuite``; medians of 20): 112 ms
with both pools at their default 2 threads, 81 ms with BLAS limited to
one thread, 59 ms with OpenMP limited to one. Limiting OpenMP (the rule
until then) left the loss and the row kernels on one core.

So, as scikit-learn's k-means does, the encoder's products run inside
grapheme's own OpenMP loops, by fixed row blocks, each block one
single-threaded BLAS call (:mod:`grapheme._products`), and a step that runs
an encoder limits BLAS to one thread (with ``threadpoolctl``), whatever
OpenMP's own count: one pool for the whole step, every kernel on every
core. Without OpenMP (a serial build) the products are numpy's and nothing
is limited. The limit is undone when the step ends; OpenMP's thread count
(``OMP_NUM_THREADS``, ``threadpool_limits(n, user_api="openmp")``) is the
step's. BLAS has no per-thread setting, so while a step runs the limit is
the whole process's, as with scikit-learn's: another Python thread's BLAS
calls then run on one thread, and with steps in several Python threads at
once the first to end restores BLAS's count while the others run (their
blocks then call a multi-threaded BLAS: correct results, more threads
than cores).
"""
import contextlib
import functools
import threading

from . import _core

__all__ = ["single_pool", "one_pool"]

_controller = None
_lock = threading.Lock()


def _get_controller():
    """threadpoolctl's view of the loaded thread pools (found once: it
    scans the loaded libraries), or None without threadpoolctl."""
    global _controller
    if _controller is None:
        with _lock:
            if _controller is None:
                try:
                    from threadpoolctl import ThreadpoolController
                except ImportError:   # pragma: no cover - a declared dependency
                    _controller = False
                else:
                    _controller = ThreadpoolController()
    return _controller or None


@contextlib.contextmanager
def single_pool(active=True):
    """Inside: BLAS runs one thread if ``active`` and grapheme is built
    with OpenMP (the products then run in OpenMP blocks,
    :func:`grapheme.ops._matmul`, each block one BLAS call), whatever
    OpenMP's own count: a block's bits must not depend on BLAS's threads
    either. Without OpenMP nothing changes."""
    ctl = _get_controller() if active and _core.openmp_threads() > 0 else None
    if ctl is not None:
        blas = ctl.select(user_api="blas").lib_controllers
        if max((lib.num_threads for lib in blas), default=1) > 1:
            with ctl.limit(limits=1, user_api="blas"):
                yield
            return
    yield


def one_pool(method):
    """Run ``method`` inside :func:`single_pool`: ``Encoder.forward`` and
    ``vjp``, and the operations whose products run on OpenMP threads
    (``MessagePassing``, ``Linear``), called from anywhere (the PyTorch
    bridge included). Nested, it costs one check (about 10 us)."""
    @functools.wraps(method)
    def wrapped(*args, **kwargs):
        with single_pool():
            return method(*args, **kwargs)
    return wrapped
