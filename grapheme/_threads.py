"""One thread pool at a time: grapheme's OpenMP kernels step aside while
numpy's BLAS runs threads.

numpy's BLAS (OpenBLAS with its own pthreads, MKL, BLIS) and grapheme's
compiled kernels (OpenMP) keep separate thread pools, and the idle threads
of each keep spinning for a while after every call. A step that alternates
the two (the encoder's products, then the neighbour sums, the morph, the
loss) hands each pool's cores to the other's spinning threads. Measured on
2 idle cores, a training step with a 2-layer encoder at d = 64 on 256 pairs
(``bench/bench_train.py``, ``EncoderStepSuite``; medians of 20): 112 ms
with both pools at their default 2 threads, 81 ms with BLAS limited to
one thread, 59 ms with OpenMP limited to one. Without an encoder there
are no large products, and OpenMP's threads are worth keeping: 14.6 ms
against 18.0 ms with OpenMP at one thread.

Inference with an encoder has the same two phases: ``Segmenter`` went from
983k to 1174k characters/s at d = 32 (392k to 453k at d = 64) with the
limit below.

So a step that runs an encoder limits OpenMP's *default* thread count to
one while BLAS runs more than one (with ``threadpoolctl``, as scikit-learn
limits BLAS inside its own OpenMP loops). A thread count the user gives
(``StructuralLoss(num_threads=k)``) is still obeyed, and with BLAS on one
thread (``OPENBLAS_NUM_THREADS=1``, ``threadpool_limits(1, "blas")``)
OpenMP keeps its threads. The limit is OpenMP's per-thread setting, undone
when the step ends.
"""
import contextlib
import functools
import threading

from . import _core

__all__ = ["blas_first", "one_pool"]

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
def blas_first(active=True):
    """Inside: OpenMP's default thread count is 1 if ``active``, BLAS runs
    more than one thread and OpenMP would too; otherwise nothing changes."""
    ctl = _get_controller() if active and _core.openmp_threads() > 1 else None
    if ctl is not None:
        blas = ctl.select(user_api="blas").lib_controllers
        if max((lib.num_threads for lib in blas), default=1) > 1:
            with ctl.limit(limits=1, user_api="openmp"):
                yield
            return
    yield


def one_pool(method):
    """Run ``method`` inside :func:`blas_first` (the encoder's own forward
    and vjp: its products and its row kernels, called from anywhere)."""
    @functools.wraps(method)
    def wrapped(*args, **kwargs):
        with blas_first():
            return method(*args, **kwargs)
    return wrapped
