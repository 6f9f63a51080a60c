"""Training data: generated tasks, real text for word segmentation, JSONL
reading and writing, demo pairs.

Data sets are JSON Lines files, one object per line, either a text target::

    {"input": "aaabbc", "target": "abc"}

or a segmentation of the input::

    {"input": "thequickfox", "segments": ["the", "quick", "fox"]}

:func:`generate` writes ``train.jsonl`` and ``val.jsonl`` for a mix of tasks,
:func:`generate_words` writes ``train``, ``val`` and ``test`` word
segmentation sets from real text, and :func:`load_pairs` reads such a file
back into a list of pairs, reporting the file name and 1-based line number
of any malformed line.

Pairs
-----
In Python a pair is ``(input, target)``: ``target`` is a ``str``, or, for a
segmentation, a ``tuple`` of non-empty ``str`` whose concatenation is the
input (``("thequickfox", ("the", "quick", "fox"))``). The tuple is the
marker: a string target is never read as a segmentation. :func:`segment_lengths`
turns the targets of a batch into gold segment lengths for the segmentation
metrics (:func:`grapheme.train.metrics.segmentation_counts`), and
:func:`target_text` gives a target's text: for a segmentation, one
character per segment, its first (``"tqf"``). (The ``Trainer`` builds a
segmentation's target graph by merging the input's own nodes and labels
the nodes of both graphs by their offsets: see
:func:`grapheme.segmentation_target`.)

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

Word segmentation (:func:`generate_words`, ``grapheme generate --task words``)
    Real text without its spaces, segmented into its words. See
    :func:`words_of` for what a word is and :func:`generate_words` for the
    examples and the split (by document, never by line). With no corpus
    given, the text is the prose of the docstrings of the Python standard
    library found at run time (:func:`stdlib_documents`): no download.
"""
import ast
import functools
import hashlib
import json
import numbers
import os
import re
import sys
import sysconfig
import unicodedata

import numpy as np

from ._validation import (as_index_array, check_allocation, check_path, check_scalar,
                          check_unicode, show)
from .checkpoint import _atomic_open, _new_file

__all__ = ["TASKS", "DEFAULT_TASKS", "DEMO_PAIRS", "generate", "make_pairs", "load_pairs",
           "write_pairs", "generate_words", "words_of", "word_spans_of", "word_pairs",
           "stdlib_documents", "read_documents", "segment_lengths", "target_text",
           "is_segmentation", "continues_cluster"]

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
    seed : int, numpy.random.Generator or anything numpy.random.default_rng takes, default 0
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
    # an int checked as every seed is; None, a Generator, a SeedSequence or
    # a list as numpy takes them
    if isinstance(seed, np.ndarray) and seed.ndim == 0:   # numpy failed on it:
        seed = seed[()]                                   # "len() of unsized object"
    if isinstance(seed, (bool, numbers.Real, str, bytes, np.generic)):
        seed = check_scalar(seed, "seed", lower=0, integer=True)
    rng = np.random.default_rng(seed)
    choice = rng.integers(0, len(tasks), size=n)
    counts = np.bincount(choice, minlength=len(tasks))
    made = [iter(TASKS[t](rng, int(c))) for t, c in zip(tasks, counts)]
    return [next(made[k]) for k in choice.tolist()]


def write_pairs(path, pairs, overwrite=False):
    """Write (input, target) pairs as JSONL, atomically.

    Parameters
    ----------
    path : str or os.PathLike
        Destination; written via a temporary file in the same directory and
        :func:`os.replace`, so it is never left half-written.
    pairs : iterable of (str, str) or (str, tuple of str)
        A tuple target is a segmentation of the input and is written as
        ``"segments"``.
    overwrite : bool, default False
        Replace an existing ``path``; without it, ``FileExistsError``.
    """
    path = _new_file(path, overwrite, "pairs file")
    with _atomic_open(path, "w", encoding="utf-8", newline="\n") as f:
        for i, pair in enumerate(pairs):
            try:
                source, target = pair
            except (TypeError, ValueError):
                raise ValueError(f"pairs[{i}] is not an (input, target) pair") from None
            _check_text(f"pairs[{i}][0]", source)
            if isinstance(target, tuple):
                _check_segments(f"pairs[{i}][1]", source, target)
                obj = {"input": source, "segments": list(target)}
            else:
                _check_text(f"pairs[{i}][1]", target)
                obj = {"input": source, "target": target}
            f.write(json.dumps(obj, ensure_ascii=False))
            f.write("\n")


def _check_new_files(out_dir, names, overwrite):
    """The paths of ``names`` in ``out_dir``, none of which may exist
    unless ``overwrite`` (checked before any is written: FileExistsError
    naming the first that does)."""
    out_dir = check_path(out_dir, "out_dir")
    paths = {name: os.path.join(out_dir, name) for name in names}
    for path in paths.values():
        _new_file(path, overwrite, "data file")
    return paths


def generate(out_dir, n_train=2000, n_val=200, seed=0, tasks=DEFAULT_TASKS, overwrite=False):
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
    overwrite : bool, default False
        Replace files already there; without it, ``FileExistsError`` before
        anything is written.

    Returns
    -------
    paths : dict
        ``{"train": path, "val": path}``.
    """
    n_train = _check_count("n_train", n_train)
    n_val = _check_count("n_val", n_val)
    seed = check_scalar(seed, "seed", lower=0, integer=True)
    tasks = _check_tasks(tasks)
    files = _check_new_files(out_dir, ("train.jsonl", "val.jsonl"), overwrite)
    os.makedirs(os.fspath(out_dir), exist_ok=True)
    train_seq, val_seq = np.random.SeedSequence(int(seed)).spawn(2)
    paths = {"train": files["train.jsonl"], "val": files["val.jsonl"]}
    write_pairs(paths["train"], make_pairs(n_train, np.random.default_rng(train_seq), tasks),
                overwrite=True)
    write_pairs(paths["val"], make_pairs(n_val, np.random.default_rng(val_seq), tasks),
                overwrite=True)
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

    A line gives its target as ``"target"`` (a string) or as ``"segments"``
    (a list of non-empty strings whose concatenation is the input), read as
    the pair ``(input, tuple(segments))``. Blank lines are skipped. Other
    keys are ignored. A UTF-8 byte order mark at the start of the file is
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
        integers longer than Python converts), not an object, a missing or
        duplicate key, both ``"target"`` and ``"segments"``, a non-string
        value, a string with a lone surrogate, or segments that are empty or
        do not join to the input.

    Examples
    --------
    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "pairs.jsonl")
    >>> write_pairs(path, [("aab", "ab"), ("thefox", ("the", "fox"))])
    >>> load_pairs(path)
    [('aab', 'ab'), ('thefox', ('the', 'fox'))]
    """
    path = check_path(path, "path")
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
                obj = json.loads(line, object_pairs_hook=_unique_keys)
            except _DuplicateKey as exc:   # json keeps the last: {"input": "a", "input": "b"}
                raise ValueError(f"{where}: duplicate key {exc.args[0]!r}") from None
            except json.JSONDecodeError as exc:
                # json's "Unterminated string starting at" names its place
                # last ("... at at column 7": an attack helper's find)
                at = "" if exc.msg.endswith(" at") else " at"
                raise ValueError(f"{where}: invalid JSON ({exc.msg}{at} column "
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
            if "input" not in obj:
                raise ValueError(f"{where}: missing key 'input'")
            if ("target" in obj) == ("segments" in obj):
                raise ValueError(f"{where}: expected exactly one of the keys 'target' "
                                 "and 'segments'" + (", got both" if "target" in obj
                                                      else ", got neither (missing key "
                                                           "'target')"))
            try:
                _check_text("'input'", obj["input"])
                if "target" in obj:
                    _check_text("'target'", obj["target"])
                    target = obj["target"]
                else:
                    segments = obj["segments"]
                    if not isinstance(segments, list):
                        raise ValueError(f"'segments' must be a list of strings, got "
                                         f"{type(segments).__name__}")
                    target = tuple(segments)
                    _check_segments("'segments'", obj["input"], target)
            except ValueError as exc:
                raise ValueError(f"{where}: {exc}") from None
            pairs.append((obj["input"], target))
    return pairs


class _DuplicateKey(Exception):
    pass


def _unique_keys(pairs):
    """A JSON object's dict, refusing a key given twice (``json`` keeps the
    last silently, so one line could say two things)."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen = set()
        raise _DuplicateKey(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return obj


def _check_segments(name, source, segments):
    """A segmentation target: non-empty strings joining to ``source``."""
    for j, seg in enumerate(segments):
        _check_text(f"{name}[{j}]", seg)
        if not seg:
            raise ValueError(f"{name}[{j}] is empty: a segment has at least one character")
    if "".join(segments) != source:
        raise ValueError(f"{name} must join to the input {show(source)}, got "
                         f"{show(''.join(segments))}")


def is_segmentation(target):
    """Whether a pair's target is a segmentation (a tuple of segments)."""
    return isinstance(target, tuple)


def target_text(target):
    """A target's text: a string target itself, a segmentation one
    character per segment, its first (the label a merged node keeps). Not
    what the ``Trainer`` compares a segmentation with (see
    :func:`grapheme.segmentation_target`).

    Examples
    --------
    >>> target_text("ab"), target_text(("the", "quick", "fox"))
    ('ab', 'tqf')
    """
    if isinstance(target, tuple):
        return "".join(seg[0] for seg in target)
    return target


def segment_lengths(targets):
    """Gold segment lengths of the segmentation targets of a batch.

    Parameters
    ----------
    targets : sequence of str or tuple of str
        The targets of the pairs; string targets have no gold segmentation.

    Returns
    -------
    lengths : ndarray of intp, shape (m,)
        Length of every segment of the selected targets, concatenated.
    counts : ndarray of intp, shape (n_selected,)
        Number of segments of each selected target.
    select : ndarray of bool, shape (len(targets),)
        Which targets are segmentations.

    Examples
    --------
    >>> lengths, counts, select = segment_lengths([("the", "fox"), "ab", ("a",)])
    >>> lengths.tolist(), counts.tolist(), select.tolist()
    ([3, 3, 1], [2, 1], [True, False, True])
    """
    select = np.array([isinstance(t, tuple) for t in targets], dtype=bool)
    chosen = [t for t in targets if isinstance(t, tuple)]
    counts = np.array([len(t) for t in chosen], dtype=np.intp)
    lengths = np.array([len(seg) for t in chosen for seg in t], dtype=np.intp)
    return lengths, counts, select


# ------------------------------------------------------------ word segmentation
# a word: a letter (Unicode: no digits, no underscore), then letters and
# combining marks (a vowel sign, a virama, an accent that has no precomposed
# letter: re's \w has no marks, and "नमस्ते" fell apart at each); apostrophes
# between letters are dropped first, so "don't" is one word. re's [^\W\d_]
# also takes the numerals of categories No and Nl ("²", "Ⅻ"): they are made
# spaces first (a class of all letters instead made the matching 3x slower).
@functools.lru_cache(maxsize=None)
def _dropped():
    """What words_of drops inside a word: an apostrophe between two
    letters, and a soft hyphen (U+00AD) or a zero-width non-joiner or
    joiner (U+200C, U+200D) after a letter or a mark (a virama) and before a
    letter: they are inside a word (a hyphenation point, Persian's
    non-joiner, a Devanagari half form) and cut it into two, a false
    boundary in the data (an attack helper's find)."""
    marks = _category_class(("M",))
    # the character first, then what is behind it (two back, it included):
    # a pattern that starts with a character set is scanned for fast (one
    # that started with the look behind made words_of 1.9x as slow)
    joiners = "[\u00ad\u200c\u200d]"
    return re.compile(r"['\u2019\u00ad\u200c\u200d]"
                      rf"(?<=[^\W\d_]['\u2019]|[^\W\d_]{joiners}|{marks}{joiners})"
                      r"(?=[^\W\d_])")


@functools.lru_cache(maxsize=None)
def _category_ranges(categories, first=0, last=sys.maxunicode):
    """The runs ``(start, end)``, inclusive, of the code points from
    ``first`` to ``last`` whose Unicode category starts with one of
    ``categories`` (a tuple), from this Python's Unicode database (0.3 s
    for all, once)."""
    ranges, start = [], None
    for c in range(first, last + 2):
        inside = c <= last and unicodedata.category(chr(c)).startswith(categories)
        if inside and start is None:
            start = c
        elif not inside and start is not None:
            ranges.append((start, c - 1))
            start = None
    return tuple(ranges)


def _category_class(categories, first=0, last=sys.maxunicode):
    """:func:`_category_ranges` as a regex character class."""
    return "[" + "".join(f"\\U{a:08x}-\\U{b:08x}"
                         for a, b in _category_ranges(categories, first, last)) + "]"


ZWJ = 0x200D   # a zero-width joiner: joins what is on both sides (emoji sequences)


#: Code points outside category M that UAX #29 makes Extend: the
#: zero-width non-joiner and joiner, the halfwidth katakana voiced sound
#: marks (Lm), the emoji skin-tone modifiers (Sk) and the tag characters
#: of emoji tag sequences (Cf).
_EXTEND = ((0x200C, 0x200D), (0xFF9E, 0xFF9F), (0x1F3FB, 0x1F3FF), (0xE0020, 0xE007F))


@functools.lru_cache(maxsize=None)
def _joining_bounds():
    """Sorted starts and ends of the code points that join the character
    before them: the combining marks (category M) and :data:`_EXTEND`."""
    ranges = sorted(_category_ranges(("M",)) + _EXTEND)
    return (np.array([a for a, _ in ranges], dtype=np.int64),
            np.array([b for _, b in ranges], dtype=np.int64))


def continues_cluster(codes):
    """Whether each code point of a text (its code points in order, an
    int array) continues the written character before it, so that no
    segment may start there: a combining mark (a vowel sign, a virama, an
    accent, a variation selector), a zero-width (non-)joiner, an emoji
    skin-tone modifier or tag character, a halfwidth voiced sound mark, or
    any code point right after a zero-width joiner. The first code point
    never does. A subset of Unicode's grapheme cluster rules (UAX #29):
    its Extend and ZWJ rules, so that a segment never starts with a mark
    or splits an emoji sequence; not its rules for Hangul jamo, regional
    indicator pairs (flags), spacing marks outside category M or prepended
    marks. O(n log r) for r runs of marks (a few hundred), vectorised.

    Examples
    --------
    >>> codes = np.array([ord(c) for c in "से👩\u200d💻a"])
    >>> continues_cluster(codes).tolist()
    [False, True, False, True, True, False]
    """
    codes = as_index_array(codes, "codes").astype(np.int64, copy=False)
    starts, ends = _joining_bounds()
    if not codes.size or codes.max() < starts[0]:   # Latin-1 text: nothing joins
        return np.zeros(codes.shape, dtype=bool)
    at = np.searchsorted(starts, codes, side="right") - 1
    joins = (at >= 0) & (codes <= ends[np.maximum(at, 0)])
    joins[1:] |= codes[:-1] == ZWJ
    if joins.size:
        joins[0] = False
    return joins


@functools.lru_cache(maxsize=None)
def _word_pattern():
    """A word: a letter, then letters and combining marks (category M)."""
    return re.compile(r"[^\W\d_](?:[^\W\d_]|" + _category_class(("M",)) + ")*")


@functools.lru_cache(maxsize=None)
def _numeral(astral):
    # those of the BMP apart: re tests a class of BMP characters by a table,
    # 20x faster than by its ranges (0.01 s, not 0.2, for 4.7 M characters)
    first, last = (0x10000, sys.maxunicode) if astral else (0, 0xFFFF)
    return re.compile(_category_class(("No", "Nl"), first, last))


def _without_numerals(text):
    """``text`` with a space for each numeral that is not a digit (``²``,
    ``Ⅻ``): the same length, so spans into it are spans into ``text``."""
    if text.isascii():
        return text
    text = _numeral(False).sub(" ", text)
    return _numeral(True).sub(" ", text) if max(text) > "\uffff" else text


def words_of(text):
    """The words of a text, as the ``words`` task defines them.

    A word is a maximal run of letters (Unicode letters) and the combining
    marks that follow them (vowel signs, viramas, accents), in NFC and
    lowercased; apostrophes between two letters are dropped first
    (``don't`` -> ``dont``), and so are a soft hyphen (U+00AD) and a
    zero-width non-joiner or joiner (U+200C, U+200D) after a letter or a
    mark and before a letter. Digits and other numerals (``²``, ``Ⅻ``),
    punctuation, underscores and whitespace separate words and are
    dropped: an example's input holds letters only, so every boundary is a
    boundary between two words, never one the punctuation gives away.
    Lowercased, so a capital letter does not give a word start away
    either.

    Examples
    --------
    >>> words_of("The quick, brown fox's 2 jumps_over")
    ['the', 'quick', 'brown', 'foxs', 'jumps', 'over']
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    text = unicodedata.normalize("NFC", _without_numerals(text))
    text = _dropped().sub("", text).lower()
    return _word_pattern().findall(unicodedata.normalize("NFC", text))   # lower() may decompose


def word_spans_of(text):
    """The words of a text as :func:`words_of` finds them, and where each
    character of them comes from in ``text``.

    Returns ``(words, start, end)``: ``words`` the list :func:`words_of`
    gives, and two int64 arrays over the characters of ``"".join(words)``:
    the character ``k`` comes from ``text[start[k]:end[k]]``. A character
    that its normalisation made several of (``"İ".lower()`` is two) gives
    each of them its span; ``start[k] == start[k - 1]`` then. Spans are
    ``[start, end)`` offsets into ``text`` as given (not its NFC form).

    Where ``text`` is in NFC (as most text is) and stays so lowercased,
    with no character that lowercases to two (``İ``), the characters map
    one to one: regular expressions and numpy, with no Python step per
    character or word. Elsewhere each letter with its combining marks is
    normalised on its own, in a Python loop over the text's characters;
    the words are then those of :func:`words_of` unless NFC would compose
    across two letters (Hangul conjoining jamo), where they are of the
    letters one by one (a capital sigma is lowercased beside its
    neighbours, so a final one gives ``ς`` as there).

    Examples
    --------
    >>> words, start, end = word_spans_of("Don't panic!")
    >>> words, start.tolist(), end.tolist()
    (['dont', 'panic'], [0, 1, 2, 4, 6, 7, 8, 9, 10], [1, 2, 3, 5, 7, 8, 9, 10, 11])
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    check_unicode(text, "text")   # as a Segmenter's texts
    return _words_of_normalised(*_normalised(text))


#: Characters per block of :func:`_normalised`.
_BY_LETTER_BLOCK = 1 << 16
_SPACE = re.compile(r"\s")


def _normalised(text):
    """``(norm, start, end)`` of ``text``: one to one where it maps so,
    else in blocks of about :data:`_BY_LETTER_BLOCK` characters, cut before
    whitespace, each one to one or letter by letter. One decomposed
    character sent a whole line letter by letter, its Python lists 230
    bytes a character (1.9 GB for the 8 MiB ``segment --words`` reads: an
    attack helper's find). Cutting before whitespace changes nothing: no
    word, apostrophe between letters, composition (whitespace is a starter)
    or final sigma (it is neither cased nor case-ignorable) spans it."""
    mapped = _normalised_one_to_one(text)
    if mapped is not None:
        return mapped
    if len(text) <= _BY_LETTER_BLOCK:
        return _normalised_by_letter(text)
    cuts, at = [0], _BY_LETTER_BLOCK
    while at < len(text) and (space := _SPACE.search(text, at)) is not None:
        cuts.append(space.start())
        at = space.start() + _BY_LETTER_BLOCK
    cuts.append(len(text))
    norms, starts, ends = [], [], []
    for a, b in zip(cuts[:-1], cuts[1:]):
        block = text[a:b]
        norm, start, end = _normalised_one_to_one(block) or _normalised_by_letter(block)
        norms.append(norm)
        starts.append(start + a)
        ends.append(end + a)
    return "".join(norms), np.concatenate(starts), np.concatenate(ends)


def _word_spans_of_texts(texts):
    """:func:`word_spans_of` of every one of ``texts`` (a list of str
    without lone surrogates), the offsets into ``"".join(texts)``. One pass
    over the texts joined by newlines where that maps one to one (a newline
    ends every word, composes with nothing and is not cased, so the joined
    text's words are the texts' words), else text by text; a Python step
    per text only then."""
    mapped = _normalised_one_to_one("\n".join(texts))
    if mapped is None:
        words, starts, ends, base = [], [], [], 0
        for text in texts:
            w, s, e = word_spans_of(text)
            words.extend(w)
            starts.append(s + base)
            ends.append(e + base)
            base += len(text)
        return (words, np.concatenate(starts) if starts else np.zeros(0, np.int64),
                np.concatenate(ends) if ends else np.zeros(0, np.int64))
    words, start, end = _words_of_normalised(*mapped)
    # text i starts at offsets[i] + i in the joined text: less the newlines
    lengths = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
    joined_starts = np.cumsum(lengths + 1) - lengths - 1
    before = np.searchsorted(joined_starts, start, side="right") - 1
    return words, start - before, end - before


def _normalised_one_to_one(text):
    """``(norm, start, end)`` as :func:`_normalised_by_letter` gives them,
    where ``text`` maps one to one (else None): where NFC changes nothing
    (equal lengths are not enough: it can compose one character and expand
    another, or reorder marks; a review's find) and lowercasing keeps the
    length (each character then gives one). O(n), no Python step per
    character."""
    if not unicodedata.is_normalized("NFC", text):
        return None
    text = _without_numerals(text)
    kept = _dropped().sub("", text)
    lower = kept.lower()
    if len(lower) != len(kept) or not unicodedata.is_normalized("NFC", lower):
        return None
    keep = np.ones(len(text), dtype=bool)
    keep[[m.start() for m in _dropped().finditer(text)]] = False
    source = np.flatnonzero(keep)
    return lower, source, source + 1


def _words_of_normalised(norm, start, end):
    """:func:`word_spans_of`'s result from the normalised text and the span
    of the text each of its characters comes from."""
    # the words and the gaps around them (no match objects: a Python step
    # per word in C's lists, not in the interpreter)
    pattern = _word_pattern()
    words = pattern.findall(norm)
    lengths = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
    gaps = pattern.split(norm)   # len(words) + 1 runs between and around them
    gap = np.fromiter(map(len, gaps), dtype=np.int64, count=len(gaps))
    first = np.cumsum(lengths) - lengths   # where each word starts in "".join(words)
    at = np.cumsum(gap[:-1]) + first       # ... and in norm
    # the characters of the words, in order: each word's start + 0 .. its length
    take = np.repeat(at - first, lengths) + np.arange(int(lengths.sum()))
    return words, start[take].astype(np.int64), end[take].astype(np.int64)


def _normalised_by_letter(text):
    """``(norm, start, end)``: ``text`` normalised as :func:`words_of` does,
    each letter with its combining marks on its own (one Python step per
    character), and the span of ``text`` each character of ``norm`` comes
    from."""
    text = _without_numerals(text)
    bounds, n, i = [], len(text), 0
    while i < n:   # the letters with their marks (a mark alone is one too)
        j = i + 1
        # and after a Hangul leading jamo or syllable, the jamo NFC composes
        # into it, no other (apart, decomposed Korean gave the model jamo
        # where words_of gives syllables: an attack helper's find)
        hangul = "\u1100" <= text[i] <= "\u1112" or "\uac00" <= text[i] <= "\ud7a3"
        while j < n and (unicodedata.category(text[j])[0] == "M" or hangul and (
                "\u1161" <= text[j] <= "\u11c2"
                and len(unicodedata.normalize("NFC", text[i:j + 1])) == 1)):
            j += 1
        bounds.append((i, j))
        i = j
    nfc = [unicodedata.normalize("NFC", text[i:j]) for i, j in bounds]
    # the apostrophes words_of drops: found in the NFC text, as there
    unit_of = np.repeat(np.arange(len(nfc)), [len(u) for u in nfc])
    dropped = {int(unit_of[m.start()]) for m in _dropped().finditer("".join(nfc))}
    kept = ["" if u in dropped else unit for u, unit in enumerate(nfc)]
    if any("\u03a3" in unit for unit in kept):
        # a capital sigma lowercases by its context (final: ς), which
        # words_of lowercases without the apostrophes: so here (one
        # neighbour each side, the apostrophe one of them, gave ς where
        # words_of gave σ: an attack helper's find). A unit's lowercase has
        # the same length alone as in context (sigma's rule keeps it).
        whole = "".join(kept).lower()
        at = np.cumsum([0] + [len(unit.lower()) for unit in kept]).tolist()
    parts, start, end = [], [], []
    for u, ((i, j), unit) in enumerate(zip(bounds, kept)):
        if not unit:
            pass
        elif "\u03a3" in unit:
            unit = unicodedata.normalize("NFC", whole[at[u]:at[u + 1]])
        else:
            unit = unicodedata.normalize("NFC", unit.lower())
        parts.append(unit)
        start.extend([i] * len(unit))
        end.extend([j] * len(unit))
    return "".join(parts), np.array(start, dtype=np.int64), np.array(end, dtype=np.int64)


def word_pairs(text, rng, min_words=4, max_words=12):
    """Segmentation pairs from one document: consecutive windows of words.

    The document's words (:func:`words_of`) are cut into consecutive,
    non-overlapping windows of ``min_words`` to ``max_words`` words (each
    length drawn uniformly from ``rng``; the last window takes what is
    left, so it may be shorter). Each window is one pair
    ``("".join(words), tuple(words))``.
    """
    return _windows(words_of(text), rng, min_words, max_words)


def _windows(words, rng, min_words, max_words):
    """:func:`word_pairs` of a document's words."""
    n = len(words)
    if n == 0:
        return []
    sizes = rng.integers(min_words, max_words + 1, size=n // min_words + 1)
    ends = np.minimum(np.cumsum(sizes), n)
    ends = ends[:int(np.searchsorted(ends, n)) + 1]
    starts = np.concatenate(([0], ends[:-1]))
    return [("".join(words[a:b]), tuple(words[a:b]))
            for a, b in zip(starts.tolist(), ends.tolist())]


_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "__pycache__", "site-packages"})


def _stdlib_files():
    """(module name, path) of every Python source module of the standard
    library (``sys.stdlib_module_names`` and their submodules), without its
    test suites. Sorted by name."""
    root = sysconfig.get_paths()["stdlib"]
    names = getattr(sys, "stdlib_module_names", None)   # Python >= 3.10
    if names is None:
        names = {os.path.splitext(f)[0] for f in os.listdir(root)}
    out = []
    for name in sorted(names):
        if name in _SKIP_DIRS:
            continue
        single = os.path.join(root, name + ".py")
        package = os.path.join(root, name)
        if os.path.isfile(single):
            out.append((name, single))
        elif os.path.isfile(os.path.join(package, "__init__.py")):
            for directory, dirs, files in os.walk(package):
                dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
                rel = os.path.relpath(directory, root).replace(os.sep, ".")
                for f in sorted(files):
                    if f.endswith(".py"):
                        stem = f[:-3]
                        out.append((rel if stem == "__init__" else f"{rel}.{stem}",
                                    os.path.join(directory, f)))
    return sorted(out)


def stdlib_documents():
    """The default corpus: one document per standard-library module.

    Reads the source of every module of the running Python's standard
    library (:data:`sys.stdlib_module_names` and their submodules, without
    the test suites) with :mod:`ast`, nothing imported, and keeps the
    docstrings of the module, its classes and its functions, joined by
    blank lines. Modules without docstrings, and sources that do not parse
    or decode, are skipped.

    Returns
    -------
    list of (str, str)
        ``(module name, text)``, sorted by name.
    """
    docs = []
    for name, path in _stdlib_files():
        try:
            with open(path, "rb") as f:
                tree = ast.parse(f.read(), filename=path)
        except (SyntaxError, ValueError, OSError):
            continue
        texts = [ast.get_docstring(node, clean=True) for node in ast.walk(tree)
                 if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                      ast.AsyncFunctionDef))]
        texts = [t for t in texts if t]
        if texts:
            docs.append((name, "\n\n".join(texts)))
    return docs


def read_documents(paths):
    """``(path, text)`` of every corpus file: one file is one document.

    Raises
    ------
    ValueError
        If ``paths`` is empty, a file is not valid UTF-8 (naming the file
        and byte), or two files hold the same text (the same file named
        twice, or a copy: one document in two splits would score the model
        on text it trained on).
    FileNotFoundError
        If a file does not exist.
    """
    if isinstance(paths, (str, bytes, os.PathLike)):
        paths = [paths]
    paths = [check_path(p, "corpus") for p in paths]
    if not paths:
        raise ValueError("corpus must name at least one file")
    docs, seen = [], {}
    for path in paths:
        with open(path, "rb") as f:
            raw = f.read()
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise ValueError(f"corpus file {path!r} is not UTF-8 ({exc.reason} at byte "
                             f"{exc.start})") from None
        # the same text twice (a file named twice, a copy): two documents
        # that could land in two splits. Texts without words are dropped
        # later, so two empty __init__.py files are no matter
        digest = hashlib.sha256(text.encode("utf-8")).digest()
        if digest in seen and words_of(text):
            raise ValueError(f"corpus files {seen[digest]!r} and {path!r} hold the same "
                             f"text: as two documents it could be in two splits (the test "
                             f"split would score text the model trained on); name it once")
        seen[digest] = path
        docs.append((path, text))
    return docs


# a blank line: whitespace alone (a no-break space too) between two line
# breaks, once every break Python knows (a lone \r too) is a \n; U+2029
# PARAGRAPH SEPARATOR is one by itself. A pattern that starts with "\n" is
# searched for fast: one that matched every kind of break was 10x slower.
_BLANK_LINES = re.compile(r"\n(?:[^\S\n]*\n)+")
_BREAKS = ("\r\n", "\r", "\v", "\f", "\x1c", "\x1d", "\x1e", "\x85", "\u2028")


def _paragraphs(text):
    """The paragraphs of a text: what its blank lines separate, those that
    are not blank themselves. Before, only a line of ASCII whitespace
    between two ``\\n`` cut (a helper's find: paragraphs of a Word text,
    or of text pasted from the web, stayed one)."""
    text = text.replace("\u2029", "\n\n")
    for other in _BREAKS:
        if other in text:
            text = text.replace(other, "\n")
    return [p for p in _BLANK_LINES.split(text) if p.strip()]


#: Share of the words each held-out split gets in :func:`generate_words`.
HELD_OUT = {"val": 0.1, "test": 0.1}


def _repeats_shown(repeated, most=3):
    """The first ``most`` of ``{repeat: original}``, for a message."""
    shown = [f"{name} repeats {first}" for name, first in list(repeated.items())[:most]]
    return "; ".join(shown) + ("; ..." if len(repeated) > most else "")


def generate_words(out_dir, corpus=None, seed=0, min_words=4, max_words=12, overwrite=False):
    """Write a word-segmentation data set: ``train``, ``val``, ``test``.

    Every example is a window of consecutive words of one document
    (:func:`word_pairs`; a word as :func:`words_of` defines it), written as
    ``{"input": "thequickfox", "segments": ["the", "quick", "fox"]}``.

    The split is **by document, never by line**: the documents are shuffled
    (by ``seed``), then ``test`` takes whole documents until it holds at
    least 10% of the words, ``val`` the same, and ``train`` the rest, each
    split at least one document. No document has examples in two splits. A
    document is a file; a corpus of one or two files (a user's own text) is
    cut at blank lines, every paragraph a document (named ``FILE#k``). A
    document with the same words as an earlier one (a paragraph repeated, a
    copy with other line endings or punctuation) is left out, so that no
    document is in two splits (where three or more files are a document
    each, a paragraph that two of them share is not found).

    Parameters
    ----------
    out_dir : str or os.PathLike
        Receives ``train.jsonl``, ``val.jsonl``, ``test.jsonl`` and
        ``documents.json`` (which documents went where, and the sizes);
        created if missing.
    corpus : sequence of str or os.PathLike, optional
        UTF-8 text files, one document each. Default: the docstrings of the
        Python standard library found at run time (:func:`stdlib_documents`),
        one document per module.
    seed : int, default 0
        The split and the window lengths; the same seed and corpus give
        byte-identical files.
    min_words, max_words : int, default 4 and 12
        Words per example.
    overwrite : bool, default False
        Replace files already there; without it, ``FileExistsError`` before
        the corpus is read.

    Returns
    -------
    dict
        ``{"train": path, "val": path, "test": path, "documents": path}``,
        ``"sizes"``: per split, ``documents``, ``examples``, ``words``
        and ``characters`` (of the inputs), ``"repeated"``: each document
        left out as a repeat, by name, with the earlier one it repeats
        (a dict, also in ``documents.json``), and
        ``"paragraphs"``: whether the documents are paragraphs (fewer than 3
        files with words) rather than files.

    Raises
    ------
    ValueError
        Fewer than 3 documents with a word, a file that is not UTF-8, bad
        ``seed``, ``min_words`` or ``max_words``.
    TypeError
        A ``seed``, ``min_words`` or ``max_words`` that is not an integer.
    """
    seed = check_scalar(seed, "seed", lower=0, integer=True)
    min_words = _check_count("min_words", min_words)
    max_words = _check_count("max_words", max_words)
    if min_words < 1 or max_words < min_words:
        raise ValueError(f"need 1 <= min_words <= max_words, got min_words="
                         f"{min_words}, max_words={max_words}")
    files = _check_new_files(out_dir, ("train.jsonl", "val.jsonl", "test.jsonl",
                                       "documents.json"), overwrite)
    docs = stdlib_documents() if corpus is None else read_documents(corpus)
    counted = [(name, text, words) for name, text in docs
               for words in [words_of(text)] if words]
    paragraphs = corpus is not None and len(counted) < 3
    if paragraphs:
        # one or two files (a user's own text): their paragraphs are the documents
        counted = [(f"{name}#{k}", par, words) for name, text, _ in counted
                   for k, par in enumerate(_paragraphs(text))
                   for words in [words_of(par)] if words]
    # a document whose words an earlier one has (a paragraph repeated, as a
    # notice is; a copy with other line endings) is left out: in two splits
    # it would score the model on text it trained on (an attack helper's
    # find). Whole documents only: a paragraph two files share is not found
    seen, repeated, unique = {}, {}, []
    for name, text, words in counted:
        key = " ".join(words)
        if key in seen:
            repeated[name] = seen[key]
        else:
            seen[key] = name
            unique.append((name, words))
    counted = unique
    if len(counted) < 3:
        raise ValueError(f"corpus: a split by document needs at least 3 documents with "
                         f"words (one file is one document; one or two files are split "
                         f"at blank lines), got {len(counted)}" + (
                             f" and {len(repeated)} with the words of an earlier one "
                             f"({_repeats_shown(repeated)})" if repeated else ""))
    split_seq, window_seq = np.random.SeedSequence(int(seed)).spawn(2)
    order = np.random.default_rng(split_seq).permutation(len(counted)).tolist()
    total = sum(len(words) for _, words in counted)
    assignment, k = {}, 0
    for split, remaining_splits in (("test", 2), ("val", 1)):
        taken = 0
        while k < len(order) - remaining_splits and (
                taken == 0 or taken < HELD_OUT[split] * total):
            assignment[order[k]] = split
            taken += len(counted[order[k]][1])
            k += 1
    for i in order[k:]:
        assignment[i] = "train"
    window_rng = np.random.default_rng(window_seq)
    pairs = {"train": [], "val": [], "test": []}
    names = {"train": [], "val": [], "test": []}
    for i, (name, words) in enumerate(counted):   # corpus order: stable streams
        split = assignment[i]   # (words_of once per document: kept from above)
        pairs[split].extend(_windows(words, window_rng, min_words, max_words))
        names[split].append(name)
    os.makedirs(os.fspath(out_dir), exist_ok=True)
    paths = {split: files[f"{split}.jsonl"] for split in pairs}
    sizes = {}
    for split, ps in pairs.items():
        write_pairs(paths[split], ps, overwrite=True)
        sizes[split] = {"documents": len(names[split]), "examples": len(ps),
                        "words": sum(len(t) for _, t in ps),
                        "characters": sum(len(s) for s, _ in ps)}
    paths["documents"] = files["documents.json"]
    with _atomic_open(paths["documents"], "w", encoding="utf-8", newline="\n") as f:
        json.dump({"corpus": "stdlib docstrings" if corpus is None else "files",
                   "seed": int(seed), "min_words": min_words, "max_words": max_words,
                   "sizes": sizes, "documents": names, "repeated": repeated}, f, indent=1,
                  ensure_ascii=False)
        f.write("\n")
    paths["sizes"] = sizes
    paths["repeated"] = repeated
    paths["paragraphs"] = paragraphs
    return paths
