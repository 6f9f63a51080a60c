"""Named arrays reused from call to call (numpy's ``out=``, kept)."""
import numpy as np

from ._validation import check_dtype

__all__ = ["Workspace", "check_workspace"]


class Workspace:
    """``ws(name, shape)``: a C-contiguous view of ``shape`` on an array kept
    under ``name``, grown by at least half when too small.

    The arrays have the workspace's ``dtype`` (float64 unless the model is
    float32), or the ``dtype`` a call asks for: a name asked for in another
    dtype than the one it holds gets a fresh array of that dtype.

    Why: a fresh (n, d) array of a few MB is often handed back to the system
    when it dies, and its page faults are paid again on the next step. At
    d = 64 a training step with a 2-layer encoder spent about as long in
    those as in its matrix products (``bench/bench_train.py``,
    ``EncoderStepSuite``). A view is valid until the next call with the same
    name: the owner (a ``Trainer`` for its steps, a ``Segmenter`` per
    thread) decides the names so that nothing still in use is overwritten.
    Not thread-safe; one per thread.
    """

    def __init__(self, dtype=np.float64):
        self.dtype = check_dtype(dtype)
        self._arrays = {}

    def __call__(self, name, shape, dtype=None):
        dtype = self.dtype if dtype is None else dtype
        size = 1
        for s in shape:
            size *= s
        buf = self._arrays.get(name)
        if buf is not None and buf.dtype != dtype:
            buf = None
        if buf is None or buf.size < size:
            buf = self._arrays[name] = np.empty(max(size, 0 if buf is None else
                                                    buf.size * 3 // 2), dtype=dtype)
        return buf[:size].reshape(shape)

    def kept(self, name):
        """How many elements the array kept under ``name`` holds (0: none)."""
        buf = self._arrays.get(name)
        return 0 if buf is None else buf.size

    def holder(self, arr):
        """The name of the array that ``arr`` may share memory with, or None
        (an O(1) bounds check per array kept)."""
        for name, buf in self._arrays.items():
            if np.may_share_memory(buf, arr):
                return name
        return None


def check_workspace(workspace, name="workspace"):
    """``workspace`` if it is a :class:`Workspace` or None, else TypeError."""
    if workspace is not None and not isinstance(workspace, Workspace):
        raise TypeError(f"{name} must be a grapheme._workspace.Workspace or None, "
                        f"got {type(workspace).__name__}")
    return workspace
