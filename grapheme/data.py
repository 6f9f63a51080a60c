"""Training data: generated tasks, JSONL reading and writing, demo pairs.

Data sets are JSON Lines files, one object per line::

    {"input": "(+ 16 9)", "target": "25"}

:func:`generate` writes ``train.jsonl`` and ``val.jsonl`` for a mix of tasks
and :func:`load_pairs` reads such a file back into a list of
``(input, target)`` string pairs, reporting the file name and 1-based line
number of any malformed line.

Tasks
-----
``"arithmetic"``
    A **control a morph cannot express**, not in the default mix
    (:data:`DEFAULT_TASKS`): level-1 Polish-notation arithmetic, as in the
    original experiments: ``(op a b)`` with ``op`` one of ``+ - *`` and
    operands in 1..20, target the decimal value (``(+ 16 9)`` -> ``25``,
    ``(- 3 7)`` -> ``-4``). A morph only merges neighbouring characters of
    its input, so it can never output a character its input lacks: most
    targets are unreachable by design, and a model's accuracy here measures
    nothing it could learn. Ask for it by name to see that.
``"dedup"``
    Runs of a repeated character collapse to one (``aaabbc`` -> ``abc``):
    merging each run into its head is exactly the right answer.
``"fold"``
    The last character is folded into its neighbour (``abc`` -> ``ab``): one
    merge of the final edge.
"""
import json
import numbers
import os
import sys

import numpy as np

from ._validation import check_allocation, show
from .checkpoint import _atomic_open

__all__ = ["TASKS", "DEFAULT_TASKS", "DEMO_PAIRS", "generate", "make_pairs", "load_pairs", "write_pairs"]

#: Built-in demo data: in each pair the last character folds into its
#: neighbour.
DEMO_PAIRS = [("abc", "ab"), ("xyz", "xy"), ("123", "12")]

_LETTERS = np.array(list("abcdefghijklmnopqrstuvwxyz"))
_OPS = ("+", "-", "*")


def _arithmetic(rng, n):
    ops = rng.integers(0, len(_OPS), size=n)
    a = rng.integers(1, 21, size=n)
    b = rng.integers(1, 21, size=n)
    out = []
    for o, x, y in zip(ops.tolist(), a.tolist(), b.tolist()):
        op = _OPS[o]
        value = x + y if op == "+" else x - y if op == "-" else x * y
        out.append((f"({op} {x} {y})", str(value)))
    return out


def _dedup(rng, n):
    out = []
    for _ in range(n):
        runs = int(rng.integers(2, 6))
        # Consecutive runs use different letters so the target has one
        # character per run.
        first = int(rng.integers(0, 26))
        steps = rng.integers(1, 26, size=runs - 1)
        letters = _LETTERS[np.cumsum(np.concatenate(([first], steps))) % 26]
        lengths = rng.integers(1, 5, size=runs)
        source = "".join(c * int(k) for c, k in zip(letters.tolist(), lengths.tolist()))
        out.append((source, "".join(letters.tolist())))
    return out


def _fold(rng, n):
    out = []
    for _ in range(n):
        length = int(rng.integers(2, 8))
        s = "".join(_LETTERS[rng.integers(0, 26, size=length)].tolist())
        out.append((s, s[:-1]))
    return out


#: Task name -> generator ``f(rng, n) -> list of (input, target)``.
TASKS = {"arithmetic": _arithmetic, "dedup": _dedup, "fold": _fold}

#: The tasks :func:`make_pairs`, :func:`generate` and ``grapheme generate``
#: mix by default: those a morph can express (not the ``"arithmetic"``
#: control).
DEFAULT_TASKS = ("dedup", "fold")


def _check_count(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {show(value)}")
    return int(value)


def _check_tasks(tasks):
    if isinstance(tasks, str):
        tasks = (tasks,)
    try:
        tasks = tuple(tasks)
    except TypeError:
        raise TypeError(f"tasks must be a sequence of task names, got {show(tasks)}") from None
    if not tasks:
        raise ValueError("tasks must name at least one task")
    for t in tasks:
        if not isinstance(t, str) or t not in TASKS:
            raise ValueError(f"tasks: unknown task {show(t)}; choose from {sorted(TASKS)}")
    return tasks


def make_pairs(n, seed=0, tasks=DEFAULT_TASKS):
    """Generate ``n`` (input, target) pairs, each from a task chosen at random.

    Parameters
    ----------
    n : int
        Number of pairs, >= 0.
    seed : int or numpy.random.Generator, default 0
        Seed of the generator; the same seed gives the same pairs.
    tasks : str or sequence of str, default :data:`DEFAULT_TASKS`
        Names from :data:`TASKS`, chosen uniformly per pair.

    Returns
    -------
    pairs : list of tuple of str

    Examples
    --------
    >>> from grapheme.data import make_pairs
    >>> make_pairs(2, seed=0, tasks="fold")
    [('qnhibba', 'qnhibb'), ('vqx', 'vq')]
    """
    n = _check_count("n", n)
    # about 200 bytes per pair (two short strings, a tuple, the draws)
    check_allocation(200 * n, f"make_pairs(n={show(n)})")
    tasks = _check_tasks(tasks)
    rng = np.random.default_rng(seed)
    choice = rng.integers(0, len(tasks), size=n)
    counts = np.bincount(choice, minlength=len(tasks))
    made = [iter(TASKS[t](rng, int(c))) for t, c in zip(tasks, counts)]
    return [next(made[k]) for k in choice.tolist()]


def write_pairs(path, pairs):
    """Write (input, target) pairs as JSONL, atomically.

    Parameters
    ----------
    path : str or os.PathLike
        Destination; written via a temporary file in the same directory and
        :func:`os.replace`, so it is never left half-written.
    pairs : iterable of (str, str)
    """
    with _atomic_open(path, "w", encoding="utf-8", newline="\n") as f:
        for i, pair in enumerate(pairs):
            try:
                source, target = pair
            except (TypeError, ValueError):
                raise ValueError(f"pairs[{i}] is not an (input, target) pair") from None
            _check_text(f"pairs[{i}][0]", source)
            _check_text(f"pairs[{i}][1]", target)
            f.write(json.dumps({"input": source, "target": target}, ensure_ascii=False))
            f.write("\n")


def generate(out_dir, n_train=2000, n_val=200, seed=0, tasks=DEFAULT_TASKS):
    """Generate a training and a validation set as JSONL files.

    Parameters
    ----------
    out_dir : str or os.PathLike
        Directory to write ``train.jsonl`` and ``val.jsonl`` into; created
        if missing.
    n_train, n_val : int
        Number of pairs in each file, >= 0.
    seed : int, default 0
        The two files come from independent streams derived from ``seed``;
        the same seed gives byte-identical files.
    tasks : str or sequence of str, default :data:`DEFAULT_TASKS`
        Task names from :data:`TASKS`.

    Returns
    -------
    paths : dict
        ``{"train": path, "val": path}``.
    """
    n_train = _check_count("n_train", n_train)
    n_val = _check_count("n_val", n_val)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {show(seed)}")
    tasks = _check_tasks(tasks)
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    train_seq, val_seq = np.random.SeedSequence(int(seed)).spawn(2)
    paths = {"train": os.path.join(out_dir, "train.jsonl"),
             "val": os.path.join(out_dir, "val.jsonl")}
    write_pairs(paths["train"], make_pairs(n_train, np.random.default_rng(train_seq), tasks))
    write_pairs(paths["val"], make_pairs(n_val, np.random.default_rng(val_seq), tasks))
    return paths


def _check_text(name, value):
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{name} contains a lone surrogate") from None


def load_pairs(path):
    """Read (input, target) pairs from a JSONL file.

    Blank lines are skipped. Keys other than ``"input"`` and ``"target"``
    are ignored. A UTF-8 byte order mark at the start of the file is
    skipped.

    Parameters
    ----------
    path : str or os.PathLike

    Returns
    -------
    pairs : list of tuple of str

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        ``"<path>:<line>: <reason>"`` for the first malformed line: invalid
        UTF-8 or JSON (including JSON nested too deeply for the parser and
        integers longer than Python converts), not an object, a missing key, a non-string value or a
        string with a lone surrogate.
    """
    path = os.fspath(path)
    pairs = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                # a UTF-8 byte order mark is allowed at the start of the file
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(f"{where}: invalid UTF-8 ({exc.reason} at byte "
                                 f"{exc.start})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: invalid JSON ({exc.msg} at column "
                                 f"{exc.colno})") from None
            except RecursionError:
                raise ValueError(f"{where}: invalid JSON (nested too deeply)") from None
            except ValueError as exc:   # an integer of more than 4300 digits
                reason = str(exc)
                if "digits" in reason:
                    limit = getattr(sys, "get_int_max_str_digits", lambda: 4300)()
                    reason = f"an integer with more than {limit} digits"
                raise ValueError(f"{where}: invalid JSON ({reason})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{where}: expected a JSON object, got "
                                 f"{type(obj).__name__}")
            for key in ("input", "target"):
                if key not in obj:
                    raise ValueError(f"{where}: missing key {key!r}")
                try:
                    _check_text(repr(key), obj[key])
                except ValueError as exc:
                    raise ValueError(f"{where}: {exc}") from None
            pairs.append((obj["input"], obj["target"]))
    return pairs
