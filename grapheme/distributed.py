"""Data-parallel training over ``torch.distributed`` (gloo on CPU, or NCCL).

A :class:`~grapheme.Trainer` given a communicator (``comm=``) trains one
rank of a data-parallel run: every rank is handed the same global batch,
computes the gradient of its contiguous shard of it (each pair weighted
``1 / B`` of the *global* batch), and one flat all-reduce (sum) of all
gradients and the step's statistics per step gives every rank exactly the
single-process gradient; every rank then applies the same optimiser step,
so the parameters stay equal without ever being sent. See
``docs/design.md`` ("Data-parallel training") and ``docs/scaling.md``.

torch is needed only here, and only imported when a :class:`TorchCommunicator`
is made. This module holds no state of its own: the process group is
torch's, created by whoever launched the ranks (``grapheme train --nproc``,
``torchrun`` or the user's own code) and handed in.
"""
import hashlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

from ._validation import check_scalar

__all__ = ["Communicator", "TorchCommunicator", "shard_bounds", "check_rank", "init_from_env",
           "spawn_local", "free_port", "ENV_VARS", "MAX_LOCAL_RANKS"]

#: The environment variables a launcher sets for every rank (torchrun's names).
ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")

#: Most ranks :func:`spawn_local` (``grapheme train --nproc``) starts on one
#: machine: a bound on a typo, not on a machine (torchrun starts any number).
MAX_LOCAL_RANKS = 1024

#: Signals that stop :func:`spawn_local` and its ranks together (besides
#: Ctrl-C): a plain ``kill``, a scheduler's or a supervisor's stop, a closed
#: terminal.
_STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP")
                      if hasattr(signal, name))


def check_rank(rank, world_size, names=("rank", "world_size")):
    """``(rank, world_size)`` as ints with ``world_size >= 1`` and ``0 <= rank <
    world_size``, else TypeError or ValueError naming them (``names``)."""
    world_size = check_scalar(world_size, names[1], lower=1, integer=True)
    rank = check_scalar(rank, names[0], lower=0, integer=True)
    if rank >= world_size:
        raise ValueError(f"{names[0]} must be < {names[1]} ({world_size}), got {rank}")
    return rank, world_size


def shard_bounds(n, rank, world_size):
    """``(lo, hi)``: rank ``rank``'s contiguous share of ``n`` items, sizes
    differing by at most one (a rank may get none when ``n < world_size``).

    >>> [shard_bounds(5, r, 2) for r in range(2)]
    [(0, 2), (2, 5)]
    """
    n = check_scalar(n, "n", lower=0, integer=True)
    rank, world_size = check_rank(rank, world_size)
    return n * rank // world_size, n * (rank + 1) // world_size


class Communicator:
    """What data-parallel training needs from a process group.

    Subclasses set ``rank`` and ``world_size`` and implement
    :meth:`all_reduce`; everything else is built on it.
    """

    rank = 0
    world_size = 1

    def all_reduce(self, buffer):
        """Sum the 1-D float64 C-contiguous ``buffer`` over all ranks, in
        place; every rank receives the same bits."""
        raise NotImplementedError   # pragma: no cover

    def all_gather_rows(self, row):
        """A ``(world_size, k)`` float64 array holding every rank's ``row``
        (k floats, the same k on every rank), by one all-reduce."""
        row = np.asarray(row, dtype=np.float64).ravel()
        rows = np.zeros((self.world_size, row.shape[0]))
        rows[self.rank] = row
        self.all_reduce(rows.reshape(-1))
        return rows

    def agree(self, what, error=None):
        """Raise on every rank if ``error`` (an exception or None) was raised
        on any: the first failing rank's exception on that rank, a
        ``RuntimeError`` naming it and ``what`` on the others. Ranks that
        decide something alone (rank 0's file checks) call this so that no
        rank goes on to wait forever for one that stopped."""
        failed = self.all_gather_rows([0.0 if error is None else 1.0])[:, 0]
        if not failed.any():
            return
        if error is not None:
            raise error
        first = int(np.flatnonzero(failed)[0])
        raise RuntimeError(f"rank {first} of {self.world_size} failed {what}; "
                           "see its error")

    def check_same(self, what, values):
        """Raise ``ValueError`` on every rank unless ``values`` (arrays and
        JSON-able numbers or strings) are bytewise the same on all ranks: a
        cheap fingerprint (SHA-256) per rank, gathered and compared."""
        h = hashlib.sha256()
        for v in values:
            if isinstance(v, np.ndarray):
                h.update(str((v.dtype.str, v.shape)).encode())
                h.update(np.ascontiguousarray(v).tobytes())
            else:
                h.update(repr(v).encode())
        digest = h.digest()
        # 4 chunks of 48 bits: exactly representable as float64
        row = [float(int.from_bytes(digest[6 * i:6 * i + 6], "little")) for i in range(4)]
        rows = self.all_gather_rows(row)
        differ = [r for r in range(self.world_size) if not np.array_equal(rows[r], rows[0])]
        if differ:
            raise ValueError(f"ranks disagree on {what}: rank(s) {differ} differ from "
                             "rank 0")


class TorchCommunicator(Communicator):
    """A :class:`Communicator` over a ``torch.distributed`` process group.

    Parameters
    ----------
    group : torch.distributed.ProcessGroup, optional
        Default: the default group (``init_process_group``'s).

    With the gloo backend the numpy buffer is reduced in place (zero-copy);
    with NCCL it is copied to the current CUDA device and back (grapheme
    computes on the CPU; NCCL is only the wire).
    """

    def __init__(self, group=None):
        dist = _torch_distributed()
        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised: call "
                               "torch.distributed.init_process_group first (grapheme "
                               "train --nproc and torchrun launches do)")
        self._dist = dist
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.backend = str(dist.get_backend(group))
        self._device = None
        if self.backend == "nccl":
            import torch

            self._device = torch.device("cuda", torch.cuda.current_device())

    def all_reduce(self, buffer):
        import torch

        if not (isinstance(buffer, np.ndarray) and buffer.dtype == np.float64
                and buffer.ndim == 1 and buffer.flags.c_contiguous and buffer.flags.writeable):
            raise TypeError("buffer must be a writeable 1-D C-contiguous float64 ndarray")
        tensor = torch.from_numpy(buffer)
        if self._device is None:
            self._dist.all_reduce(tensor, op=self._dist.ReduceOp.SUM, group=self.group)
        else:
            on_device = tensor.to(self._device)
            self._dist.all_reduce(on_device, op=self._dist.ReduceOp.SUM, group=self.group)
            tensor.copy_(on_device.cpu())

    def __repr__(self):
        return (f"TorchCommunicator(rank={self.rank}, world_size={self.world_size}, "
                f"backend={self.backend!r})")


def _torch_distributed():
    try:
        import torch.distributed as dist
    except ImportError:
        raise ImportError("data-parallel training needs PyTorch: pip install "
                          "'grapheme[torch]'") from None
    if not dist.is_available():
        raise ImportError("this PyTorch build has no torch.distributed")
    return dist


#: Longest ``timeout`` of :func:`init_from_env`, in seconds (a year).
MAX_TIMEOUT = 365 * 86400


def check_backend(backend):
    """``backend``, ``"gloo"`` or ``"nccl"``; nccl only where torch sees a
    CUDA GPU (else torch fails inside ``set_device``, without saying why)."""
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    if backend == "nccl":
        _torch_distributed()   # torch installed, or the message that says so
        import torch

        if not torch.cuda.is_available():
            raise ValueError("backend 'nccl' needs CUDA GPUs, and this torch sees none "
                             "(torch.cuda.is_available() is False): use gloo on CPUs")


def init_from_env(backend="gloo", timeout=None):
    """Join the process group a launcher described in the environment
    (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``, as torchrun
    and :func:`spawn_local` set them) and return its :class:`TorchCommunicator`.

    ``backend``: ``"gloo"`` (CPU) or ``"nccl"`` (the device is
    ``cuda:LOCAL_RANK``). ``timeout``: seconds a collective may wait for
    the other ranks (torch's default when None).
    """
    check_backend(backend)
    missing = [v for v in ENV_VARS if v != "LOCAL_RANK" and v not in os.environ]
    if missing:
        raise ValueError(f"a distributed launch needs the environment variables "
                         f"{', '.join(missing)} (torchrun sets them)")
    values = {}
    for var in ("RANK", "WORLD_SIZE", "MASTER_PORT"):
        try:
            values[var] = int(os.environ[var])
        except ValueError:
            raise ValueError(f"{var}={os.environ[var]!r} in the environment is not an "
                             "integer") from None
    # before joining: a rank outside the group would wait for ever
    check_rank(values["RANK"], values["WORLD_SIZE"],
               ("RANK in the environment", "WORLD_SIZE in the environment"))
    check_scalar(values["MASTER_PORT"], "MASTER_PORT in the environment", lower=1,
                 upper=65535, integer=True)
    if timeout is not None:   # at most a year: datetime.timedelta's range, with room
        timeout = check_scalar(timeout, "timeout", lower=0, lower_inclusive=False,
                               upper=MAX_TIMEOUT)
    dist = _torch_distributed()
    kwargs = {}
    if timeout is not None:
        import datetime

        kwargs["timeout"] = datetime.timedelta(seconds=timeout)
    if backend == "nccl":
        import torch

        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, init_method="env://", **kwargs)
    return TorchCommunicator()


def destroy():
    """Leave the default process group (after :func:`init_from_env`), if
    one was joined. torch is not imported here: a Ctrl-C that stopped its
    import left a half-made module, whose import again raised
    AttributeError over the interrupt (an attack helper's find)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and getattr(dist, "is_initialized", None) is not None and (
            dist.is_available() and dist.is_initialized()):
        dist.destroy_process_group()


def free_port(host="127.0.0.1"):
    """A TCP port free on ``host`` right now (for a local rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def spawn_local(command, nproc, *, env=None, threads=None, poll=0.05, grace=5.0):
    """Run ``command`` (an argv list) as ``nproc`` ranks on this machine and
    wait; return 0 if all succeed, else the first failing rank's exit code
    (``128 + n`` if signal ``n`` ended it, which is then said on stderr).

    Every rank gets the variables torchrun would set (``RANK``,
    ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` =
    127.0.0.1, ``MASTER_PORT`` a free port) and, unless already set, the
    thread counts ``OMP_NUM_THREADS`` and ``OPENBLAS_NUM_THREADS`` (=
    ``threads``, default ``cpu_count // nproc``, at least 1), so that the
    ranks do not oversubscribe the cores. Rank 0 writes to this process's
    stdout and stderr; the others' stdout is discarded and their stderr
    shown only if they fail. When one rank fails the others are terminated
    (SIGTERM, then SIGKILL after ``grace`` s); on ``KeyboardInterrupt``
    (Ctrl-C, which the ranks of a terminal's process group get too) the
    ranks have ``grace`` s to end by themselves first. A
    SIGTERM or SIGHUP to this process stops the ranks the same way, and
    then this returns ``128 + the signal's number`` (143 for SIGTERM), as
    the shell reports a process the signal ended. The handlers are this
    call's (set from the main thread only; the previous ones come back when
    it returns) and only note the signal, so nothing cuts a stop short; a
    signal this process ignores (``nohup``: SIGHUP) stays ignored, by the
    ranks too. A rank outlives a SIGKILL of this process, or a stop signal
    while this runs outside the main thread.
    """
    if (not isinstance(command, (list, tuple)) or not command
            or not all(isinstance(a, (str, bytes, os.PathLike)) for a in command)):
        raise TypeError("command must be a non-empty list of str (an argv)")
    nproc = check_scalar(nproc, "nproc", lower=1, upper=MAX_LOCAL_RANKS, integer=True)
    if threads is not None:
        threads = check_scalar(threads, "threads", lower=1, integer=True)
    poll = check_scalar(poll, "poll", lower=0, lower_inclusive=False)
    grace = check_scalar(grace, "grace", lower=0)
    base = dict(os.environ if env is None else env)
    if threads is None:
        threads = max(1, (os.cpu_count() or 1) // nproc)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        base.setdefault(var, str(threads))
    base.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
                WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc))
    procs, errs = [], []
    stopped = []    # the stop signals received: noted, never raised mid-statement
    previous = {}
    try:
        if threading.current_thread() is threading.main_thread():
            for sig in _STOP_SIGNALS:
                if signal.getsignal(sig) is not signal.SIG_IGN:   # nohup's stays ignored
                    previous[sig] = signal.signal(sig, lambda signum, frame:
                                                  stopped.append(signum))
        for rank in range(nproc):
            if stopped:
                break
            rank_env = dict(base, RANK=str(rank), LOCAL_RANK=str(rank))
            if rank == 0:
                procs.append(subprocess.Popen(command, env=rank_env))
                errs.append(None)
            else:
                err = tempfile.TemporaryFile()
                errs.append(err)
                procs.append(subprocess.Popen(command, env=rank_env,
                                              stdout=subprocess.DEVNULL, stderr=err))
        failed = None
        # every rank polled every time (a rank that died while rank 0 runs
        # used to go unnoticed: rank 0 then waited for it in a collective)
        while not stopped and failed is None and [p.poll() for p in procs].count(None):
            failed = next((r for r, p in enumerate(procs)
                           if p.returncode not in (None, 0)), None)
            if failed is None:
                time.sleep(poll)
        if stopped:
            _stop(procs, grace)
            return 128 + stopped[0]
        if failed is None:
            failed = next((r for r, p in enumerate(procs) if p.returncode != 0), None)
        if failed is None:
            return 0
        rank0 = procs[0].returncode   # before the stop: None, still running
        _stop(procs, grace)
        # rank 0 writes to this terminal: another rank's message is shown
        # unless rank 0 had failed with its own before. Stopped by _stop it
        # said only that (the console script's "stopped by SIGTERM", status
        # 143: a review's find, the failing rank's message was lost)
        if failed != 0 and (rank0 is None or rank0 <= 0):
            errs[failed].seek(0)
            sys.stderr.write(errs[failed].read().decode("utf-8", "replace"))
        code = procs[failed].returncode
        if code < 0:   # a signal ended it: it said nothing, so say it here
            name = signal.Signals(-code).name if -code in _SIGNAL_NUMBERS else str(-code)
            sys.stderr.write(f"rank {failed} of {nproc} was killed by signal {name}\n")
            return 128 - code
        return code
    except KeyboardInterrupt:
        # a terminal's Ctrl-C reached the ranks too (one process group): they
        # stop on their own first (rank 0 names its checkpoint and removes
        # its lock; terminated at once, it did neither: found by a review
        # helper), and what is left after the grace is stopped
        try:
            _wait(procs, grace)
        finally:
            _stop(procs, grace)
        raise
    except BaseException:
        _stop(procs, grace)
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        for err in errs:
            if err is not None:
                err.close()


_SIGNAL_NUMBERS = {int(s) for s in signal.Signals}


def _wait(procs, seconds):
    """Wait up to ``seconds`` in all for the processes to end by themselves."""
    deadline = time.monotonic() + seconds
    for p in procs:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            return


def _stop(procs, grace):
    """SIGTERM to the processes still running, SIGKILL to those left after
    ``grace`` s (said on stderr: they could say nothing); every one reaped."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    _wait(procs, grace)
    for rank, p in enumerate(procs):
        if p.poll() is None:
            p.kill()
            sys.stderr.write(f"rank {rank} did not end within {grace:g} s of the stop and "
                             "was killed\n")
        p.wait()
