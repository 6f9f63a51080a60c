"""The ``grapheme`` command: generate data, train, evaluate, use, draw, demo.

Usage::

    grapheme generate --out data/generated [--n-train N] [--n-val N] [--seed S]
                      [--tasks dedup fold ...]
    grapheme generate --task words [--corpus FILE ...] --out data/words [--seed S]
    grapheme train --data DIR|FILE [--val FILE] --epochs N --out RUN [--batch-size B]
                   [--lr LR] [--seed S] [--estimator NAME] [--target-kept-fraction F]
                   [--resume CKPT] [--keep-best METRIC] [--overwrite] [--nproc N]
    torchrun --nnodes M --nproc-per-node N ... -m grapheme.cli train ...
    grapheme eval --checkpoint RUN/checkpoint.npz --data DIR|FILE
    grapheme segment --model MODEL [--sep SEP] [TEXT ...]     # or lines on stdin
    grapheme plot RUN [--out FILE.png|DIR] [--overwrite]
    grapheme show --model MODEL TEXT --out FILE.png|DIR [--overwrite]
    grapheme demo

``--data`` takes a file or a directory wherever it appears: a directory
means its ``train.jsonl`` (and ``val.jsonl``, if there) for ``train`` and
its ``val.jsonl`` for ``eval``. A MODEL is a file written by
``Segmenter.save`` or a training checkpoint (``RUN/checkpoint.npz``,
``RUN/best.npz``).

Errors in the input (a missing directory, a malformed data line, a corrupted
checkpoint, not enough memory for the settings) print one line to stderr and
exit with status 2. Nothing is written before the arguments, the data and
the checkpoint to resume have been checked. ``train`` never replaces a run
already in ``--out`` (a ``metrics.jsonl``, ``checkpoint.npz`` or ``best.npz``
there)
unless told: ``--resume OUT/checkpoint.npz`` continues it, ``--overwrite``
replaces it.

``train --nproc N`` trains data-parallel in N processes of this machine
(``torch.distributed``, gloo over 127.0.0.1); launched by ``torchrun`` (the
environment holds ``WORLD_SIZE``) every process trains one rank of the run
torchrun describes, across machines too. Every rank reads the whole
``--data``; only rank 0 writes ``--out`` and prints.
"""
import argparse
import contextlib
import difflib
import os
import shlex
import signal
import stat
import sys
import threading
import time
import traceback

from . import __version__
from . import data as _data
from .checkpoint import _ends_with_separator
from .distributed import _STOP_SIGNALS, MAX_LOCAL_RANKS, MAX_TIMEOUT
from .estimators import ESTIMATORS
from ._validation import check_pairs, check_scalar
from .plot import check_png
from .train.metrics import SEGMENTATION_KEYS
from .train.trainer import UNKNOWN_PROB

__all__ = ["main"]

PROG = "grapheme"
DEFAULT_ESTIMATOR = "ste"
#: Message-passing layers before the merge in ``train`` and ``demo``.
ENCODER_LAYERS = 2
#: Adam's learning rate per estimator when ``--lr`` is not given: the
#: largest of 1e-2, 3e-3, 1e-3 with which every estimator's run on each
#: generated task ends with a lower loss and no lower validation accuracy
#: than it started with, without the unknown row's replacements
#: (``tests/test_context_learning.py::test_defaults_descend``; with them,
#: ``test_the_unknown_row_keeps_dedup``).
#: At 1e-2, ``history`` on dedup rose from 0.17 to 0.23 (seed 1).
DEFAULT_LR = {"history": 3e-3, "soft": 3e-3, "ste": 3e-3, "reinforce": 1e-3}
BATCH_SIZE = 64
DIM = 64


class CommandError(Exception):
    """An error in the user's input, reported as one line with exit code 2."""


def _number(kind, **bounds):
    """An argparse ``type`` parsing ``kind`` (int or float) within ``bounds``
    (keywords of :func:`grapheme._validation.check_scalar`)."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            noun = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {noun}, got {text!r}") from None
        try:
            return check_scalar(value, "value", integer=kind is int, **bounds)
        except (TypeError, ValueError) as exc:
            raise argparse.ArgumentTypeError(str(exc).replace("value ", "", 1)) from None
    return parse


def _path(text):
    """An argparse ``type`` for a path: not empty (train said "No such file
    or directory: ''", generate "out_dir must name a file")."""
    if not text:
        raise argparse.ArgumentTypeError("expected a path, got an empty one")
    return text


_positive_int = _number(int, lower=1)
_batch_chars = _number(int, lower=1, upper=1 << 30)
#: ``segment``'s default ``--max-line-bytes``: about 1 GB of memory at
#: most for the line in each mode (measured peaks, on top of the model's
#: buffers: 7 bytes a byte of a line as text, 100 with ``--words``, whose
#: map back to the text is per character, 200 with ``--format jsonl``,
#: whose scores are Python floats before they are JSON).
MAX_LINE_BYTES = 1 << 27
MAX_LINE_BYTES_WORDS = 1 << 23
MAX_LINE_BYTES_JSONL = 1 << 22
_nproc = _number(int, lower=1, upper=MAX_LOCAL_RANKS)
_nonneg_int = _number(int, lower=0)
_positive_float = _number(float, lower=0, lower_inclusive=False)
_rate = _number(float, lower=0.0, upper=1.0)
_timeout = _number(float, lower=0, lower_inclusive=False, upper=MAX_TIMEOUT)
_unknown_prob = _number(float, lower=0.0, upper=1.0, upper_inclusive=False)


def build_parser(prog=PROG):
    """The argument parser of the ``grapheme`` command, called ``prog`` in
    its usage lines."""
    if not isinstance(prog, str):
        raise TypeError(f"prog must be a str, got {type(prog).__name__}")
    parser = argparse.ArgumentParser(
        prog=prog, description="Vocabulary-free text models whose graph changes shape.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}",
                        help="print the version of grapheme and exit")
    traceback_help = ("on an error, the full Python traceback instead of one line (for a "
                      "bug report)")
    parser.add_argument("--traceback", action="store_true", help=traceback_help)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("generate", help="write a data set (JSONL): generated tasks, or "
                                        "word segmentation of real text")
    p.add_argument("--out", required=True, type=_path, help="output directory")
    p.add_argument("--task", default=None, choices=("words",),
                   help="'words': word segmentation of real text (--corpus, default the "
                        "Python standard library's docstrings) split by document into "
                        "train/val/test; without it, a mix of generated tasks (--tasks)")
    p.add_argument("--corpus", nargs="+", default=None, metavar="FILE",
                   help="UTF-8 text files for --task words, one document each (one or "
                        "two files are cut at blank lines, a paragraph per document)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a data set already in --out, the replaced words data "
                        "set's test.jsonl and documents.json included (a run trained on "
                        "it would then be scored on other splits)")
    p.add_argument("--n-train", type=_positive_int, default=None,
                   help="generated pairs in train.jsonl (default 2000; at least 1, as "
                        "train refuses an empty file)")
    p.add_argument("--n-val", type=_nonneg_int, default=None,
                   help="generated pairs in val.jsonl (default 200)")
    p.add_argument("--seed", type=_nonneg_int, default=0,
                   help="seed of the generated pairs, or of the document split (default 0)")
    p.add_argument("--tasks", nargs="+", default=None,
                   choices=sorted(_data.TASKS),
                   help=f"tasks to mix (default: {' '.join(_data.DEFAULT_TASKS)}); "
                        "'arithmetic' is a control a morph cannot express (a morph only "
                        "keeps characters of its input), so it is only mixed in by name")

    # A setting of the model has the default None here and gets its value in
    # _train_locked: given with --resume, it is refused (the checkpoint's
    # settings rule), so "not given" must be told from "given the default".
    p = sub.add_parser("train", help="train a model on JSONL pairs")
    p.add_argument("--data", required=True, metavar="DIR|FILE",
                   help="training pairs: a JSONL file, or a directory holding train.jsonl "
                        "(and val.jsonl, used for validation unless --val is given)")
    p.add_argument("--val", default=None, metavar="FILE",
                   help="validation pairs (JSONL), evaluated after every epoch")
    p.add_argument("--epochs", type=_positive_int, required=True,
                   help="total number of epochs (including resumed ones)")
    p.add_argument("--out", required=True, type=_path,
                   help="run directory: receives metrics.jsonl and checkpoint.npz (and "
                        "best.npz with --keep-best)")
    p.add_argument("--batch-size", type=_positive_int, default=None,
                   help=f"pairs per step (default {BATCH_SIZE}; the Trainer's own default "
                        f"is 32)")
    p.add_argument("--lr", type=_positive_float, default=None,
                   help="Adam learning rate (default per estimator: " + ", ".join(
                       f"{k} {v:g}" for k, v in DEFAULT_LR.items()) + "); with --resume, "
                        "the run continues with this one (after a divergence: resume "
                        "the checkpoint that is still good with a smaller one)")
    p.add_argument("--seed", type=_nonneg_int, default=None,
                   help="seed of the embedding, the shuffling, the unknown-row draws and "
                        "REINFORCE's samples (default 0)")
    p.add_argument("--dim", type=_positive_int, default=None,
                   help=f"embedding dimension (default {DIM})")
    p.add_argument("--dtype", default=None, choices=("float64", "float32"),
                   help="floating-point type of the embedding, encoder and morph "
                        "(default float64; the loss computes in float64 either way)")
    p.add_argument("--encoder-layers", type=_nonneg_int, default=None,
                   help="message-passing layers before the merge, with learned routing "
                        f"(default {ENCODER_LAYERS}; 0: the context-free model)")
    p.add_argument("--estimator", default=None, choices=ESTIMATORS,
                   help=f"merge gradient estimator (default {DEFAULT_ESTIMATOR!r}: "
                        "hard merges whose threshold still learns)")
    p.add_argument("--baseline", default=None, choices=("mean", "loo", "none"),
                   help="reinforce baseline (default 'mean')")
    p.add_argument("--samples", type=_positive_int, default=None,
                   help="reinforce samples per example (default 1; 'loo' needs >= 2)")
    p.add_argument("--target-kept-fraction", "--target-rate", type=_rate, default=None,
                   dest="target_kept_fraction", metavar="F",
                   help="hold the kept fraction (output nodes / input nodes, in [0, 1]) "
                        "at F with a rate controller (--target-rate: its older name)")
    p.add_argument("--unknown-prob", type=_unknown_prob, default=None, metavar="P",
                   help="probability that a training character is read through the "
                        "unknown row, which teaches it to stand for characters never seen "
                        f"in training (default {UNKNOWN_PROB:g})")
    p.add_argument("--resume", default=None,
                   help="continue from this checkpoint; the model settings come "
                        "from it (the learning rate too, unless --lr)")
    p.add_argument("--new-data", action="store_true",
                   help="with --resume: continue on data other than the checkpoint's "
                        "(refused otherwise)")
    p.add_argument("--keep-best", default=None, metavar="METRIC",
                   help="keep OUT/best.npz, the checkpoint with the best value of this "
                        "validation metric (e.g. val_boundary_f1, val_accuracy, val_loss), "
                        "the untrained model's included; needs validation pairs. A run "
                        "resumed with --resume (without --new-data) keeps on the metric "
                        "its checkpoint kept; another one is refused while best.npz "
                        "holds that record (unless --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a run already in --out, its best.npz included, once "
                        "the new run's first epoch is done (without it, an existing run "
                        "is only continued with --resume OUT/checkpoint.npz)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar and no line per epoch on stderr (the result, "
                        "with the training time, is still printed)")
    p.add_argument("--nproc", type=_nproc, default=None, metavar="N",
                   help=f"train data-parallel in N processes on this machine (at most "
                        f"{MAX_LOCAL_RANKS}; needs "
                        "PyTorch; each takes 1/N of every batch; the result is the "
                        "one-process run's up to rounding); under torchrun, omit it")
    p.add_argument("--backend", default=None, choices=("gloo", "nccl"),
                   help="torch.distributed backend of a data-parallel run (default gloo; "
                        "nccl: the gradients travel through the GPUs of cuda:LOCAL_RANK)")
    p.add_argument("--timeout", type=_timeout, default=None, metavar="SECONDS",
                   help="how long a data-parallel rank waits for the others in a "
                        "collective before it stops with an error (default: torch's, "
                        "30 minutes): a rank that hangs, or a launch whose peers never "
                        "come")

    p = sub.add_parser("eval", help="loss, exact-structure accuracy (and segmentation "
                                    "metrics) of a checkpoint beside the untrained model's")
    p.add_argument("--checkpoint", required=True,
                   help="a training checkpoint (RUN/checkpoint.npz or RUN/best.npz), or a "
                        "model file (Segmenter.save; its loss is grapheme train's)")
    p.add_argument("--data", required=True, metavar="DIR|FILE",
                   help="pairs to evaluate: a JSONL file, or a directory (its val.jsonl)")
    p.add_argument("--batch-size", type=_positive_int, default=None,
                   help="pairs per evaluated batch (default: the checkpoint's)")

    p = sub.add_parser("segment", help="segment text with a trained model")
    p.add_argument("--model", required=True,
                   help="a model file (Segmenter.save) or a training checkpoint")
    p.add_argument("texts", nargs="*", metavar="TEXT",
                   help="texts to segment; without any, every line of standard input "
                        "(UTF-8), read and written in batches")
    p.add_argument("--sep", default=None,
                   help="written between the segments of a text (default: one space; "
                        "one with a newline gives up one output line per text); with "
                        "--format text only")
    p.add_argument("--words", action="store_true",
                   help="raw text, for a model trained on words (generate --task words): "
                        "each text as given, with --sep inserted only where the model "
                        "cuts one of its words (runs of letters, lowercased as in training); "
                        "case, digits, punctuation and spaces stay as they are")
    p.add_argument("--batch-chars", type=_batch_chars, default=1 << 14,
                   help="about how many characters of standard input (read as UTF-8) are "
                        "segmented per batch (default 16384; a longer line is one batch, "
                        "segmented in windows of bounded memory)")
    p.add_argument("--max-line-bytes", type=_positive_int, default=None,
                   help="the longest line of standard input read, in bytes of UTF-8 "
                        "(a CRLF line's \\r counted); a longer one is refused by its "
                        "number. A line is held whole while it is segmented, so without "
                        "a bound an input without newlines (/dev/zero) took all memory: "
                        "about 7 bytes of memory a byte of it, 100 with --words, 200 "
                        "with --format jsonl, hence the defaults, about 1 GB each: 128 "
                        "MiB, 8 MiB with --words, 4 MiB with --format jsonl")
    p.add_argument("--format", choices=("text", "jsonl"), default="text",
                   help="'text': each text with --sep between its segments (the default); "
                        "'jsonl': one JSON object a text, its \"segments\", their "
                        "\"starts\" and every character's \"scores\" (the probability "
                        "that a segment starts there), or with --words its \"words\" "
                        "and their \"spans\" ([start, end) offsets into the text)")
    p.add_argument("--errors", choices=("strict", "replace"), default="strict",
                   help="bytes that are not UTF-8 (in TEXT or standard input): 'strict' "
                        "stops at them, naming their line (the default); 'replace' reads "
                        "each bad sequence as one U+FFFD (a character no model saw), as "
                        "bytes.decode does, and goes on")

    p = sub.add_parser("plot", help="draw a run's metrics per epoch (needs matplotlib)")
    p.add_argument("run", metavar="RUN",
                   help="a run directory holding metrics.jsonl, or the metrics file")
    p.add_argument("--out", default=None, metavar="FILE.png",
                   help="the picture to write, or a directory to write metrics.png into "
                        "(default: metrics.png beside the metrics); an existing file is "
                        "not replaced without --overwrite")
    p.add_argument("--overwrite", action="store_true", help="replace an existing picture")

    p = sub.add_parser("show", help="draw a text with its learned segments as coloured "
                                    "spans (needs matplotlib)")
    p.add_argument("--model", required=True,
                   help="a model file (Segmenter.save) or a training checkpoint")
    p.add_argument("text", metavar="TEXT", help="the text to segment and draw")
    p.add_argument("--words", action="store_true",
                   help="raw text, for a model trained on words (as segment --words): the "
                        "pieces of its words, spaces and punctuation drawn uncoloured")
    p.add_argument("--out", required=True, metavar="FILE.png",
                   help="the picture to write, or a directory to write segments.png into; "
                        "an existing file is not replaced without --overwrite")
    p.add_argument("--overwrite", action="store_true", help="replace an existing picture")

    p = sub.add_parser("demo", help="train on built-in data and print what was learned")
    p.add_argument("--epochs", type=_positive_int, default=150,
                   help="epochs per estimator (default 150)")
    p.add_argument("--seed", type=_nonneg_int, default=0,
                   help="seed of the generated pairs and of training: the embeddings, the "
                        "shuffling and REINFORCE's samples (default 0)")
    # after the command too (grapheme train ... --traceback was refused: an
    # attack helper's find); SUPPRESS leaves the top level's value unless given
    for command in sub.choices.values():
        command.add_argument("--traceback", action="store_true", default=argparse.SUPPRESS,
                             help=traceback_help)
    return parser


# --------------------------------------------------------------------- commands
#: The files of a data set that ``grapheme generate`` writes (the words
#: task all four, the generated tasks the first two).
DATASET_FILES = ("train.jsonl", "val.jsonl", "test.jsonl", "documents.json")


def _cmd_generate(args, out):
    # locked as train locks its --out, from before the look at what it
    # holds: two generates into one --out each wrote their files, and one
    # train.jsonl ended beside the other's val.jsonl (an attack helper's find)
    _held_by_out(args.out, ())   # a file, a dangling link: refused before anything is made
    with _removed_if_left_empty(args.out):   # refused or failed: an --out made for it goes
        os.makedirs(args.out, exist_ok=True)
        with _run_lock(args.out, "generate"):
            return _generate_into(args, out)


def _generate_into(args, out):
    existing = _held_by_out(args.out, DATASET_FILES)
    writes = _written(args.task)
    if any(name in writes for name in existing) and not args.overwrite:
        raise CommandError(f"--out {args.out!r} already holds a data set "
                           f"({', '.join(existing)}); pass --overwrite to replace it")
    # each file is replaced on its own: one that cannot be (a directory in
    # its place) is refused before the others are, not after, which left
    # two data sets mixed (an attack helper's find)
    for name in writes:
        path = os.path.join(args.out, name)
        if name in existing and not os.path.isfile(path):
            raise CommandError(f"--out {args.out!r} holds {name} as other than a file: "
                               f"nothing was written")
    code = _generate(args, out)
    # a replaced words set's files that the new one did not write (its
    # test.jsonl under generated pairs): left, eval would score them. Only
    # a whole words set's (documents.json and train.jsonl): a test.jsonl
    # of the user's own beside nothing else of ours is not ours to remove
    words_set = "documents.json" in existing and "train.jsonl" in existing
    stale = [name for name in existing if name not in writes
             and os.path.isfile(os.path.join(args.out, name))] if words_set else []
    for name in stale:
        os.remove(os.path.join(args.out, name))
    if stale:
        print(f"removed the replaced data set's {', '.join(stale)}", file=out)
    return code


def _written(task):
    """The files of :data:`DATASET_FILES` that ``generate --task TASK`` writes."""
    return DATASET_FILES if task == "words" else DATASET_FILES[:2]


def _generate(args, out):
    """The data set of ``grapheme generate``, written into ``--out``."""
    if args.task == "words":
        for path in args.corpus or ():
            if not os.path.isfile(path):
                raise CommandError(f"--corpus {path!r} is not a file")
        given = [flag for flag, value in (("--n-train", args.n_train),
                                          ("--n-val", args.n_val), ("--tasks", args.tasks))
                 if value is not None]
        if given:
            why = [w for w, flags in (
                ("the corpus decides the number of examples", ("--n-train", "--n-val")),
                (f"--tasks names generated tasks ({', '.join(sorted(_data.TASKS))}), which "
                 f"--task words replaces", ("--tasks",))) if set(flags) & set(given)]
            raise CommandError(f"{', '.join(given)} cannot be combined with --task words: "
                               + "; ".join(why))
        start = time.perf_counter()
        with _removed_if_left_empty(args.out):
            # --out checked above (replaced only with --overwrite)
            paths = _data.generate_words(args.out, corpus=args.corpus, seed=args.seed,
                                         overwrite=True)
        corpus = ("the standard library's docstrings" if args.corpus is None
                  else f"{len(args.corpus)} file(s)")
        print(f"word segmentation of {corpus}, split by document "
              f"({time.perf_counter() - start:.1f} s):", file=out)
        for split in ("train", "val", "test"):
            n = paths["sizes"][split]
            print(f"  {paths[split]}: {n['examples']} examples, {n['words']} words, "
                  f"{n['characters']} characters from {n['documents']} documents", file=out)
        print(f"  which document went where: {paths['documents']}", file=out)
        if paths["repeated"]:
            n = len(paths["repeated"])
            print(f"note: {n} document{'s' * (n != 1)} with the words of an earlier one "
                  f"({_data._repeats_shown(paths['repeated'])}) {'were' if n != 1 else 'was'} "
                  f"left out, so that no document is in two splits (all in "
                  f"{paths['documents']}, \"repeated\")", file=out)
        sizes = paths["sizes"]
        share = sizes["train"]["words"] / max(sum(n["words"] for n in sizes.values()), 1)
        if share < 0.5:   # whole documents: a few large files leave train little
            print(f"note: train holds {share:.0%} of the words: val and test take whole "
                  f"documents until each holds {_data.HELD_OUT['val']:.0%} of the words, "
                  "so more, smaller files leave train more" + (
                      " (three or more --corpus files are a document each; one or two are "
                      "cut at blank lines, a paragraph per document)"
                      # not where the files with words were too few and
                      # were cut (an attack helper's find: said of 3 files,
                      # two of them empty)
                      if args.corpus is not None and not paths["paragraphs"] else ""),
                  file=out)
        return 0
    if args.corpus is not None:
        raise CommandError("--corpus needs --task words")
    n_train = 2000 if args.n_train is None else args.n_train
    n_val = 200 if args.n_val is None else args.n_val
    tasks = list(_data.DEFAULT_TASKS) if args.tasks is None else args.tasks
    with _removed_if_left_empty(args.out):
        paths = _data.generate(args.out, n_train=n_train, n_val=n_val, seed=args.seed,
                               tasks=tasks, overwrite=True)   # --out checked above
    print(f"wrote {n_train} pairs to {paths['train']} and {n_val} pairs "
          f"to {paths['val']}", file=out)
    return 0


@contextlib.contextmanager
def _removed_if_left_empty(path):
    """On an error (a refused allocation, a diverged run), remove ``path``
    and the parents the command made for it, where they are empty
    directories now and did not exist before: a failed command leaves
    nothing behind (``os.rmdir`` removes only an empty one)."""
    made, parent = [], os.path.abspath(path)
    while not os.path.lexists(parent):   # path, then its missing parents
        made.append(parent)
        parent = os.path.dirname(parent)
    try:
        yield
    except BaseException:
        for directory in made:   # innermost first
            try:
                os.rmdir(directory)
            except OSError:
                break
        raise


#: The advisory lock a training run holds on its --out (see _run_lock).
RUN_LOCK = ".grapheme-train.lock"


@contextlib.contextmanager
def _run_lock(out_dir, command="train"):
    """Hold an advisory lock (``fcntl.flock``) on ``out_dir``'s
    :data:`RUN_LOCK` while ``grapheme command`` writes ``out_dir``: a second
    ``train`` (or ``generate``) into the same ``--out`` is refused
    (CommandError naming the holder's command and pid) instead of the two
    interleaving their logs and replacing each other's checkpoints (or
    leaving one's train.jsonl beside the other's val.jsonl). The kernel
    releases the lock when the process ends, however it ends (kill -9
    included); the file is removed on the way out. Nothing
    is locked where ``fcntl`` is missing (Windows);
    where the file system cannot lock (some network file systems), a
    warning goes to stderr and the run goes on unlocked."""
    try:
        import fcntl
    except ImportError:   # pragma: no cover - not POSIX
        fcntl = None
    if fcntl is None:
        yield
        return
    path = os.path.join(out_dir, RUN_LOCK)
    unlockable = None
    while True:
        # never through a link: the pid is written over the file's contents
        # (a symbolic link there truncated the file it named)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
        except OSError as exc:
            if os.path.lexists(path) and not os.path.islink(path):   # a directory, another's
                raise CommandError(f"--out {out_dir!r} holds {RUN_LOCK}, which cannot be "
                                   f"opened ({exc.strerror or exc}): remove it if no grapheme "
                                   "command is writing --out") from None
            if not os.path.islink(path):   # named as --out's, not as the lock's
                raise CommandError(f"--out {out_dir!r} cannot be written: "
                                   f"{exc.strerror or exc}") from None
            raise CommandError(f"--out {out_dir!r} holds {RUN_LOCK} as a symbolic link, "
                               f"which no grapheme command makes: remove it") from exc
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink > 1:
            os.close(fd)
            raise CommandError(f"--out {out_dir!r} holds {RUN_LOCK} as a hard link or other "
                               f"than a file, which no grapheme command makes: remove it")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:   # held
            # "pid command" (a lock written before the command was: "pid")
            pid, _, holder = (os.read(fd, 64).decode("ascii", "replace").strip()
                              .partition(" "))
            os.close(fd)
            raise CommandError(f"--out {out_dir!r} is being written by another grapheme "
                               f"{holder or 'train'} (pid {pid or '?'}); wait for it, or "
                               "choose another --out") from None
        except OSError as exc:   # ENOLCK, ENOSYS, EOPNOTSUPP: no locks here
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(path)
            unlockable = exc.strerror or str(exc)
            break
        # the holder before us may have removed the file we locked: then
        # the lock is on a file no longer there, and the next run's would be
        # on another; lock the one the path names
        if _names(path, fd):
            break
        os.close(fd)
    if unlockable is not None:
        _warn(f"{PROG} {command}: warning: --out {out_dir!r} cannot be locked "
              f"({unlockable}); a second {command} into it would not be refused")
        yield
        return
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {command}".encode("ascii"))
        yield
    finally:
        try:
            if _names(path, fd):   # ours still: removed before the lock goes
                os.unlink(path)
        except OSError:   # gone already: nothing to remove
            pass
        finally:
            os.close(fd)


def _names(path, fd):
    """Whether ``path`` names the open file ``fd`` (False if it names none)."""
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)


def _make_trainer(*, dim, seed, estimator, target_rate, lr, batch_size, log, progress,
                  baseline="mean", samples=1, overwrite=False, encoder_layers=ENCODER_LAYERS,
                  unknown_prob=UNKNOWN_PROB, comm=None, dtype="float64"):
    from .embedding import Embedding
    from .loss import StructuralLoss
    from .morph import Morpher
    from .optim import Adam
    from .train import Trainer

    from .estimators import Reinforce, make_estimator

    try:
        if estimator == "reinforce" and baseline == "loo" and samples < 2:
            raise ValueError(f"--baseline loo needs --samples >= 2, got --samples {samples}")
        if estimator == "reinforce":
            estimator = Reinforce(baseline=None if baseline == "none" else baseline,
                                  samples=samples, seed=seed)
        elif samples != 1:
            raise ValueError(f"--samples needs --estimator reinforce, got {estimator!r}")
        elif baseline != "mean":
            raise ValueError(f"--baseline needs --estimator reinforce, got {estimator!r}")
        morpher = Morpher(estimator=make_estimator(estimator), rate=target_rate)
    except (TypeError, ValueError) as exc:
        raise CommandError(str(exc)) from None
    from .encoder import Encoder, check_training_memory

    # first: its checks name --dim's bounds
    embedding = Embedding(dim=dim, seed=seed, dtype=dtype)
    if encoder_layers:   # the Trainer's check, before the weights are made
        check_training_memory(dim, encoder_layers, embedding.dtype,
                              f"training a {encoder_layers}-layer encoder at --dim {dim}")
    encoder = Encoder(dim, layers=encoder_layers, dtype=dtype) if encoder_layers else None
    return Trainer(embedding, morpher, StructuralLoss.for_training(), Adam(lr=lr),
                   batch_size=batch_size, seed=seed, log=log, progress=progress,
                   overwrite=overwrite, encoder=encoder, unknown_prob=unknown_prob,
                   comm=comm)


#: Seconds a stop (Ctrl-C, SIGTERM, SIGHUP) has to end one rank of a
#: data-parallel launch before the rank ends at once (see
#: :func:`_stops_end_a_waiting_rank`).
STOP_GRACE = 10.0


@contextlib.contextmanager
def _stops_end_a_waiting_rank(rank):
    """A stop ends this rank within :data:`STOP_GRACE` seconds even while it
    waits for the other ranks. Python runs a signal's handler only when the
    main thread comes back from C, and a rank waiting in torch's rendezvous
    or in a collective for a peer that never comes does not: Ctrl-C and
    SIGTERM did nothing until the launch's timeout (30 minutes by default),
    and a launcher's SIGKILL then ended rank 0 without a word (an attack
    helper's find). The signal also wakes a thread here (through
    ``signal.set_wakeup_fd``); if the rank is still running a grace later,
    the thread says why and ends the process (``os._exit``, status 128 +
    the signal): its last checkpoint stands, its lock file is left for the
    next run to reuse. Only in the console script's own process, whose stop
    signals it raises (:func:`run`)."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGTERM) is not _raise_stopped):
        yield
        return
    stops = {int(sig) for sig in _STOP_SIGNALS} | {int(signal.SIGINT)}
    r, w = os.pipe()
    os.set_blocking(w, False)
    previous = signal.set_wakeup_fd(w, warn_on_full_buffer=False)

    def watch():
        try:
            while True:
                byte = os.read(r, 1)
                if not byte:   # the rank ended its run: nothing to watch
                    return
                if byte[0] in stops:
                    break
            time.sleep(STOP_GRACE)
            name = signal.Signals(byte[0]).name
            _warn(f"{PROG}: rank {rank}: {name} did not end the rank within {STOP_GRACE:g} s "
                  "(it waits for the other ranks inside torch, where Python cannot stop it): "
                  "ended now; its last checkpoint stands")
            os._exit(128 + byte[0])
        finally:
            os.close(r)
    threading.Thread(target=watch, name="grapheme-stop-watch", daemon=True).start()
    try:
        yield
    finally:
        signal.set_wakeup_fd(previous)
        os.close(w)   # the watcher reads the end of the pipe and returns


def _cmd_train(args, out):
    """``train``: in this process; as the parent of ``--nproc`` ranks; or as
    one rank of a launch (``WORLD_SIZE`` in the environment)."""
    world = os.environ.get("WORLD_SIZE")
    if world is None and args.nproc in (None, 1):   # one process: they do nothing
        given = [f"--{name}" for name in ("backend", "timeout")
                 if getattr(args, name) is not None]
        if given:
            raise CommandError(f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'}"
                               " to a data-parallel run (--nproc N above 1, or under "
                               "torchrun)")
    if world is None or world.strip() == "1":
        if args.backend is not None:   # here, not once per rank; with one process
            from . import distributed  # too (nccl on a CPU machine was taken: an
                                       # attack helper's find)
            try:
                distributed.check_backend(args.backend)
            except (ValueError, ImportError) as exc:
                raise CommandError(f"--backend {args.backend}: {exc}") from None
        if world is not None and os.environ.get("RANK", "0").strip() != "0":
            # the one process of a launch is rank 0 (RANK=1 trained: the same find)
            raise CommandError(f"RANK={os.environ['RANK']!r} in the environment is not a "
                               "rank of WORLD_SIZE=1 (it must be 0)")
        if args.nproc is not None and args.nproc > 1:
            return _train(args, out, spawn=args.nproc)
        return _train(args, out)
    try:
        world = int(world)
    except ValueError:
        raise CommandError(f"WORLD_SIZE={world!r} in the environment is not an "
                           "integer") from None
    if world < 1:   # else "needs the variables RANK, ..." would blame others
        raise CommandError(f"WORLD_SIZE={world} in the environment must be at least 1")
    if args.nproc is not None and args.nproc != world:
        raise CommandError(f"--nproc {args.nproc} disagrees with the launcher's "
                           f"WORLD_SIZE={world} (under torchrun, omit --nproc)")
    from . import distributed

    rank = os.environ.get("RANK", "?")
    with _stops_end_a_waiting_rank(rank):
        try:
            comm = distributed.init_from_env(args.backend or "gloo", timeout=args.timeout)
            if comm.rank == 0:
                return _train(args, out, comm=comm)
            with open(os.devnull, "w", encoding="utf-8") as null:
                return _train(args, null, comm=comm)
        except RuntimeError as exc:   # torch's and Communicator.agree's: a peer failed,
            # or never came (the rendezvous's timeout)
            raise CommandError(f"rank {rank}: {exc}") from None
        finally:
            distributed.destroy()


def _train(args, out, spawn=None, comm=None):
    """``train`` in this process (``spawn``: as the parent of that many
    ranks; ``comm``: as one rank); the run's lock on ``--out`` is held
    until it returns."""
    with contextlib.ExitStack() as held:
        return _train_locked(args, out, spawn, comm, held)


def _lock_out(held, out_dir, comm, lock, check=None):
    """Lock ``out_dir`` into ``held`` if ``lock``, then run ``check`` (rank
    0's look at ``--out``, if given); every rank agrees on the outcome
    before any goes on, so none waits in a collective for a rank 0 that was
    refused."""
    refused = None
    try:
        if lock:
            held.enter_context(_run_lock(out_dir))
        if check is not None:
            check()
    except CommandError as exc:
        refused = exc
    if comm is not None:
        comm.agree("to lock and check --out", refused)
    elif refused is not None:
        raise refused


#: The settings of ``train`` that a checkpoint holds: refused beside
#: ``--resume`` (each takes a value).
FIXED_BY_CHECKPOINT = ("batch_size", "seed", "dim", "dtype", "estimator", "baseline",
                       "samples", "target_kept_fraction", "encoder_layers", "unknown_prob")


def _train_locked(args, out, spawn, comm, held):
    """``train`` with ``held`` (an exit stack) holding the lock on an
    existing ``--out``: the checks, the trainer, the ranks (``spawn``) or
    the run, then its report."""
    rank0 = comm is None or comm.rank == 0
    if args.new_data and args.resume is None:
        raise CommandError("--new-data goes with --resume (it lets a run continue on data "
                           "other than its checkpoint's)")
    if args.resume is not None:
        fixed = [f"--{name.replace('_', '-')}" for name in FIXED_BY_CHECKPOINT
                 if getattr(args, name) is not None]
        if fixed:
            raise CommandError(f"{', '.join(fixed)} cannot be combined with --resume: "
                               "the settings come from the checkpoint")
    pairs, val, val_path = _train_data(args)
    log = os.path.join(args.out, "metrics.jsonl")
    checkpoint = os.path.join(args.out, "checkpoint.npz")
    # the training process locks an --out that exists before it looks at it
    # (another run could change it in between: a resume would rewind it);
    # a new one once made, below. The other ranks never look at --out.
    locked = rank0 and spawn is None and os.path.isdir(args.out)
    _lock_out(held, args.out, comm, locked,
              (lambda: _check_run_directory(args, log, checkpoint)) if rank0 else None)
    trainer = _train_trainer(args, out, log, comm, rank0 and spawn is None)
    trainer._summary = False   # the report below says it, on stdout
    new_data = _check_same_data(args, trainer, pairs)
    start = trainer.epoch
    given_keep_best = args.keep_best is not None
    # fit's check of the kept best file, first and in the command's words
    # (a launch's ranks: fit's)
    checks_best = comm is None and not args.overwrite and start < args.epochs
    if args.keep_best is None and trainer.best is not None:
        # said only where it trains ("started anew" beside "nothing to do"
        # read as a contradiction: a data scientist's find)
        args.keep_best = _kept_on_best(args, out, trainer, val, checkpoint,
                                       rank0 and spawn is None and start < args.epochs,
                                       checks_best, new_data)
    if rank0 and args.overwrite and not _continues_its_run(args.resume, checkpoint):
        # the replaced run's files this run writes no new version of, removed
        # with its log after the first epoch; not the model it resumed from
        for name in ("metrics.png",) + (("best.npz",) if args.keep_best is None else ()):
            stale = os.path.join(args.out, name)
            if os.path.isfile(stale) and not _continues_its_run(args.resume, stale):
                trainer._replaced_files.append(stale)
    best = None
    if args.keep_best is not None:
        if not val:
            raise CommandError("--keep-best needs validation pairs (--val FILE, or "
                               "val.jsonl in the --data directory)"
                               + (f": {val_path!r} holds none" if val_path else ""))
        try:
            best = trainer._check_keep_best(args.keep_best, None, val, checkpoint)
        except ValueError as exc:
            raise CommandError(f"--keep-best: {exc}") from None
        if given_keep_best and checks_best:
            _check_best_kept_on(args.keep_best, args, trainer, val, new_data)
    if spawn is not None:   # everything is checked: now the ranks
        from .distributed import _torch_distributed, spawn_local

        _torch_distributed()   # torch missing: say so once, here
        out.flush()
        try:
            # a rank stuck in a collective ends itself STOP_GRACE s after a
            # stop, saying so: killed before, it said nothing and left the
            # lock (an attack helper's find)
            return spawn_local(_rank_command(args.argv, args.prog), spawn,
                               grace=STOP_GRACE + 5)
        except KeyboardInterrupt:   # Ctrl-C: rank 0 has said what is saved, on this
            return 128 + signal.SIGINT   # stderr (a second "interrupted" followed it)
    # a resumed model, measured once, by all ranks together: printed beside
    # the result (a fresh run's untrained model is measured by fit)
    before = None
    if val and 0 < start < args.epochs:
        before = _validation(trainer._val_record(val))
    started = time.perf_counter()
    with _removed_if_left_empty(args.out):
        if start < args.epochs and rank0:   # only now: everything above is checked
            os.makedirs(args.out, exist_ok=True)
        with contextlib.ExitStack() as made:   # released before an empty --out goes
            if comm is not None or not locked:   # the same calls on every rank
                # an --out made since the look above is looked at again, now
                # locked (another run could have made it in between: an
                # attack helper's find, its run replaced)
                newly = rank0 and not locked and start < args.epochs
                _lock_out(made, args.out, comm, newly,
                          (lambda: _check_run_directory(args, log, checkpoint))
                          if newly else None)
            if comm is None and start < args.epochs:   # locked and looked at: it trains
                _note_busy_cores("train")
                started = time.perf_counter()
            try:
                history = trainer.fit(pairs, args.epochs, val=val or None,
                                      checkpoint=checkpoint, keep_best=args.keep_best,
                                      new_data=args.new_data)
            except KeyboardInterrupt as exc:   # Ctrl-C, or a stop signal (Stopped)
                saved = trainer._last_checkpoint
                if not rank0:
                    raise
                if saved is None or saved[1] <= start:   # it said only "interrupted"
                    exc.args = ((f"no epoch of this run finished: {args.resume} still "
                                 f"holds epoch {start}" if start else "no epoch of this run "
                                 "finished, so nothing of it is saved"),)
                    raise exc from None
                exc.args = (f"epoch {saved[1]} is saved; to continue the run: "
                            f"{_resume_command(args.argv, saved[0], args.prog)}",)
                raise exc from None
    seconds = time.perf_counter() - started
    if len(history) == start:   # nothing was written: name only the checkpoint read
        print(f"nothing to do: {args.resume} already has {start} epochs "
              f"(--epochs {args.epochs})", file=out)
        return 0
    if start == 0 and trainer.baseline is not None:
        before = _validation(trainer.baseline)
    _train_report(args, out, trainer, start, seconds, before, (val, val_path))
    print(f"metrics: {log}\ncheckpoint: {checkpoint}", file=out)
    if best is not None and trainer.best is not None:
        print(f"best: {best} (epoch {trainer.best['epoch']}, {trainer.best['metric']} "
              f"{trainer.best['value']:.4f})", file=out)
    return 0


def _check_same_data(args, trainer, pairs):
    """Refuse a resume on data other than its checkpoint's without
    ``--new-data``, as :meth:`~grapheme.Trainer.fit` would, but first (a
    new user's find: a note on ``--keep-best`` came before the refusal) and
    in the command's words; else whether the data is other (``--new-data``)."""
    from .train.trainer import data_fingerprint

    old = trainer._loaded_fingerprint
    if args.resume is None or old is None:
        return False
    now = data_fingerprint(*check_pairs(pairs, "pairs"))
    if now["sha256"] != old["sha256"] and not args.new_data:
        raise CommandError(
            f"--data is not the data {args.resume!r} was trained on ({old['pairs']} pairs, "
            f"sha256 {old['sha256'][:12]}...; now {now['pairs']} pairs, sha256 "
            f"{now['sha256'][:12]}...): resume with that data, start a new run, or add "
            "--new-data to continue on this")
    return now["sha256"] != old["sha256"]


def _check_best_kept_on(keep_best, args, trainer, val, new_data=False):
    """Refuse a resume whose record of ``keep_best`` would replace a file
    in best.npz unasked (:meth:`Trainer._best_replaced_by`): the
    checkpoint's record, starting anew for another metric (a new user's
    find: the best by val_accuracy went, unsaid, for a worse one by
    val_loss), other validation pairs or ``new_data``, or a file this run
    did not write (attack helpers' finds: each was replaced)."""
    from .train.trainer import val_fingerprints

    best = os.path.join(args.out, "best.npz")
    why = trainer._best_replaced_by(keep_best, best, val_fingerprints(*check_pairs(val, "val")),
                                    new_data)
    what = f"--keep-best {keep_best}"
    if why is None:
        return
    if why == "foreign":
        raise CommandError(
            f"{what}: {best!r} is not this run's (another run's best, or not a checkpoint), "
            "which a record here would replace; move it away first, or add --overwrite")
    metric = trainer.best["metric"]
    held = f"{best!r} holds the best {metric} (epoch {trainer.best['epoch']})"
    if why == "metric":
        raise CommandError(
            f"{what}: {held}, which a record of {keep_best} would replace; keep on with "
            f"--keep-best {metric} (or without --keep-best), move it away first, or add "
            "--overwrite")
    if why == "val":
        raise CommandError(
            f"{what}: {held} measured on other validation pairs, which a record on these "
            "would replace; validate on the pairs it was measured on, move it away first, "
            "or add --overwrite")
    raise CommandError(
        f"{what}: {held} of the data the checkpoint was trained on, which a record on the "
        "new data would replace; move it away first, or add --overwrite")


def _kept_on_best(args, out, trainer, val, checkpoint, announce, checks_best, new_data):
    """The ``--keep-best`` metric of a resumed run that kept its best and
    was not given one: its checkpoint's, on the data and validation pairs
    it was measured on (else its best.npz stays at the epoch it stopped at,
    unsaid: a new user's find), or None on new data, other validation pairs
    (a record on those would replace best.npz, which needs --keep-best and
    --overwrite: a diff reviewer's find, it was refused with no way to opt
    out) or validation pairs without the metric; said (if ``announce``)
    either way. ``new_data``: the data is not the checkpoint's (``--new-data``
    on the same data keeps it on: an attack helper's find)."""
    from .train.trainer import _measured_on, val_fingerprints

    metric, why = trainer.best["metric"], None
    anew = f"--keep-best {metric} --overwrite starts a record on"
    if not val:
        why = "no validation pairs"
    elif new_data:
        why = f"new data ({anew} it)"
    else:
        try:
            trainer._check_keep_best(metric, None, val, checkpoint)
        except ValueError:
            why = f"the validation pairs have no {metric}"
        else:
            if not _measured_on(trainer.best, val_fingerprints(*check_pairs(val, "val"))):
                why = f"other validation pairs than its best's ({anew} them)"
    if why is None and checks_best:   # before it says "kept on"
        _check_best_kept_on(metric, args, trainer, val)
    if announce and why is None:
        # fit starts the record anew where best.npz does not hold it
        # ("kept on" was said where a new record began: an attack helper's find)
        best = os.path.join(args.out, "best.npz")
        lost = (None if trainer._best_held_by(best)
                else f"{best} does not hold its best, epoch {trainer.best['epoch']}")
        print(f"--keep-best {metric}: kept on from the checkpoint" + (
            f", its record started anew at epoch {trainer.epoch} ({lost})" if lost else ""),
            file=out)
    elif announce:   # where it lies now (a moved run's record names the old place)
        here = os.path.join(args.out, "best.npz")
        where = here if trainer._best_held_by(here) else trainer.best["path"]
        print(f"note: {where} stays at epoch {trainer.best['epoch']}, not kept on: {why}",
              file=out)
    return metric if why is None else None


def _resume_command(argv, checkpoint, prog=PROG):
    """The ``grapheme train`` command line of ``argv`` that resumes from
    ``checkpoint``, started as ``prog``: its own ``--resume`` (abbreviated
    or not) replaced, no ``--overwrite`` (the run in ``--out`` is the one
    continued) and none of the settings the checkpoint holds (``--seed 3``:
    refused with ``--resume``), by any of their names."""
    actions = {o: a for o, a in _commands(build_parser())["train"]._option_string_actions.items()
               if o.startswith("--")}
    valued = {"resume", *FIXED_BY_CHECKPOINT}   # by dest: an alias too (--target-rate)
    kept, skip = [], False
    for i, tok in enumerate(argv):
        if skip:
            skip = False
            continue
        name = tok.split("=", 1)[0] if tok.startswith("--") and "--" not in argv[:i] else None
        whole = [name] if name in actions else [o for o in actions if name and o.startswith(name)]
        # one action, though its spellings (--target-rate, --target-kept-fraction) are two
        dests = {actions[o].dest for o in whole}
        if len(dests) == 1 and dests <= valued | {"overwrite"}:
            skip = dests <= valued and "=" not in tok
            continue
        kept.append(tok)
    return " ".join([prog, shlex.join([*kept, "--resume", checkpoint])])


def _train_data(args):
    """``train``'s pairs, validation pairs (or None) and their file."""
    train_path, val_path = _data_file(args.data, "train"), args.val
    if val_path is None and os.path.isdir(args.data):
        val_path = os.path.join(args.data, "val.jsonl")
        if os.path.lexists(val_path) and not os.path.isfile(val_path):
            # a directory or a pipe there was skipped: no validation, unsaid
            # (an attack helper's find)
            raise CommandError(f"--data {args.data!r} holds val.jsonl as other than a "
                               "regular file")
        val_path = val_path if os.path.isfile(val_path) else None
    elif val_path is not None and not os.path.isfile(val_path):
        raise CommandError(f"--val {val_path!r} is not a file")
    pairs = _load_pairs(train_path)
    if not pairs:
        raise CommandError(f"{train_path!r} holds no pairs")
    val = _load_pairs(val_path) if val_path is not None else None
    if args.val is not None and not val:   # a directory's empty val.jsonl: no validation
        raise CommandError(f"--val {val_path!r} holds no pairs")
    return pairs, val, val_path


def _train_trainer(args, out, log, comm, announce):
    """``train``'s trainer: resumed from ``--resume`` (``--lr`` applied, and
    announced if ``announce``), or made from the options and the defaults."""
    from .train import Trainer

    progress = not args.no_progress and (comm is None or comm.rank == 0)
    if args.resume is not None:
        # overwrite: a checkpoint of epoch 0 (an untrained best.npz) starts afresh
        trainer = Trainer.from_checkpoint(_checkpoint_file(args.resume, "--resume"), log=log,
                                          progress=progress, comm=comm,
                                          overwrite=args.overwrite)
        if args.lr is not None and args.lr != trainer.optimizer.lr:
            if announce and trainer.epoch < args.epochs:   # the ranks' rank 0 says it
                print(f"learning rate {trainer.optimizer.lr:g} -> {args.lr:g} from epoch "
                      f"{trainer.epoch + 1}", file=out)
            trainer.optimizer.lr = args.lr
        return trainer
    estimator = DEFAULT_ESTIMATOR if args.estimator is None else args.estimator
    return _make_trainer(
        dim=DIM if args.dim is None else args.dim,
        seed=0 if args.seed is None else args.seed,
        estimator=estimator,
        target_rate=args.target_kept_fraction,
        baseline="mean" if args.baseline is None else args.baseline,
        samples=1 if args.samples is None else args.samples,
        lr=DEFAULT_LR[estimator] if args.lr is None else args.lr,
        batch_size=BATCH_SIZE if args.batch_size is None else args.batch_size,
        log=log, progress=progress, overwrite=args.overwrite,
        encoder_layers=ENCODER_LAYERS if args.encoder_layers is None
        else args.encoder_layers,
        unknown_prob=UNKNOWN_PROB if args.unknown_prob is None else args.unknown_prob,
        comm=comm, dtype="float64" if args.dtype is None else args.dtype)


def _train_report(args, out, trainer, start, seconds, before, validation):
    """``train``'s summary of the epochs it ran: a line, then the
    validation table (``before``: the model it started from; ``validation``:
    the pairs and their file)."""
    val, val_path = validation
    first, last = trainer.history[start], trainer.history[-1]
    # the time too: with --no-progress it is the only report of the run
    if last["epoch"] == start + 1:   # one epoch: its loss, not "X -> X"
        ran = f"epoch {last['epoch']} in {seconds:.1f} s: loss {last['loss']:.4f}"
    else:
        ran = (f"epochs {start + 1}-{last['epoch']} in {seconds:.1f} s: loss "
               f"{first['loss']:.4f} -> {last['loss']:.4f}")
    print(f"{ran}, kept fraction "
          f"{last['kept_fraction']:.3f}, tau {last['tau']:.4f}", file=out)
    if before is None:
        return
    what = "untrained" if start == 0 else f"epoch {start}"
    columns = [(what, before), (f"epoch {last['epoch']}", _validation(last))]
    if args.keep_best is not None and trainer.best is not None:
        # the record of the kept best, shown when it has every metric
        epoch = trainer.best["epoch"]
        if epoch == start:
            kept = before
        else:
            kept = _validation(next((r for r in trainer.history if r["epoch"] == epoch), {}))
        if all(k in kept for k in TABLE_KEYS if all(k in r for _, r in columns)):
            columns.append((f"best (epoch {epoch})", kept))
    print(f"validation: {len(val)} pairs from {val_path}", file=out)
    print(metrics_table(columns), file=out)


def _held_by_out(out_dir, names):
    """Which of the files ``names`` the directory ``--out`` already holds;
    refuses an ``--out`` that is a file."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise CommandError(f"--out {out_dir!r} exists and is not a directory")
    if os.path.islink(out_dir) and not os.path.exists(out_dir):   # else "File exists"
        raise CommandError(f"--out {out_dir!r} is a symbolic link to "
                           f"{os.readlink(out_dir)!r}, which does not exist")
    return [n for n in names if os.path.exists(os.path.join(out_dir, n))]


def _continues_its_run(resume, checkpoint):
    """Whether ``--resume`` is ``checkpoint``, a file of the run in ``--out``."""
    return (resume is not None and os.path.exists(checkpoint) and os.path.exists(resume)
            and os.path.samefile(resume, checkpoint))


def _check_run_directory(args, log, checkpoint):
    """Refuse an ``--out`` that is a file, or that holds a run this command
    would replace without ``--overwrite`` (continuing it with ``--resume``
    of its own checkpoint is fine)."""
    existing = _held_by_out(args.out, [os.path.basename(p) for p in (checkpoint, log)]
                            + ["best.npz"])
    if not existing or args.overwrite:
        return
    if _continues_its_run(args.resume, checkpoint):
        return
    held = f"--out {args.out!r} already holds a run ({', '.join(existing)})"
    # --resume of its checkpoint is advice only where there is one to resume
    resume = (f"--resume {checkpoint} to continue that run, "
              if os.path.isfile(checkpoint) else "")
    if args.resume is not None:   # a --resume that is no file is named as such
        _checkpoint_file(args.resume, "--resume")
        raise CommandError(f"{held}, and --resume {args.resume!r} is not its checkpoint: "
                           f"pass {resume}--overwrite to replace it, or another --out")
    raise CommandError(f"{held}; pass {resume}--overwrite to replace it, or another --out")


def _cmd_eval(args, out):
    from .checkpoint import MODEL_KIND, load_checkpoint
    from .loss import StructuralLoss
    from .optim import Adam
    from .train import Trainer

    path = _data_file(args.data, "eval")
    pairs = _load_pairs(path)
    if not pairs:
        raise CommandError(f"{path!r} holds no pairs")
    checkpoint = _existing_file(args.checkpoint, "--checkpoint", "checkpoint file",
                                ("checkpoint.npz", "best.npz", "model.npz"),
                                "a run's checkpoint.npz or best.npz, or a model file")
    if load_checkpoint(checkpoint)[1].get("kind") == MODEL_KIND:
        # a model file holds no loss and no optimiser: grapheme train's loss
        # scores it, at the batch size train uses by default
        from .segmenter import Segmenter

        trainer = Trainer.from_model(Segmenter.load(checkpoint),
                                     StructuralLoss.for_training(), Adam(),
                                     batch_size=BATCH_SIZE, progress=False)
        column = "model"
    else:
        trainer = Trainer.from_checkpoint(checkpoint, progress=False)
        column = f"epoch {trainer.epoch}"
    result = trainer.evaluate(pairs, batch_size=args.batch_size)
    # the untrained model of the same configuration, for comparison
    untrained = _untrained(trainer).evaluate(pairs, batch_size=args.batch_size)
    print(f"evaluated: {len(pairs)} pairs from {path}", file=out)
    print(metrics_table([("untrained", untrained), (column, result)]), file=out)
    return 0


#: The rows of the metric tables ``train`` and ``eval`` print, in order.
TABLE_KEYS = ("loss", "node", "edge", "clique", "kept_fraction", "accuracy",
              *SEGMENTATION_KEYS)


def metrics_table(columns):
    """The table of metrics ``train`` and ``eval`` print: ``columns`` is a
    list of ``(header, record)``; a row per metric of :data:`TABLE_KEYS`
    that every record has, four decimals, the first column "metric"."""
    keys = [k for k in TABLE_KEYS if all(k in record for _, record in columns)]
    rows = [[k] + [f"{record[k]:.4f}" for _, record in columns] for k in keys]
    return format_table(["metric"] + [header for header, _ in columns], rows)


def _validation(record):
    """The ``val_*`` metrics of an epoch record, without the prefix."""
    return {k[len("val_"):]: v for k, v in record.items() if k.startswith("val_")}


def _untrained(trainer):
    """A fresh trainer of ``trainer``'s configuration (the same seeds): the
    model before its first step, its table holding the characters the
    trained one has rows for (as fit grows it before the first step)."""
    from .embedding import UNKNOWN

    fresh = type(trainer)._from_config(trainer.config(), progress=False)
    codes = trainer.embedding.codes
    fresh.embedding.rows(codes[codes != UNKNOWN])
    return fresh


def _load_pairs(path):
    """:func:`grapheme.data.load_pairs`; a file that is not JSON at all
    (plain text, most likely) is told how pairs are made from text."""
    try:
        return _data.load_pairs(path)
    except ValueError as exc:
        if ": invalid JSON" in str(exc) or ": invalid UTF-8" in str(exc):
            raise CommandError(f"{exc}; pairs are read as JSONL (grapheme generate "
                               "writes them; from your own UTF-8 text: grapheme generate "
                               "--task words --corpus FILE --out DIR)") from None
        raise


def _data_file(data, command):
    """The JSONL file ``--data`` names for ``command``: the file itself, or in
    a directory its train.jsonl (train) or val.jsonl (eval)."""
    if os.path.isfile(data):
        return data
    if os.path.exists(data) and not os.path.isdir(data):
        raise CommandError(f"--data {data!r} is not a regular file (a pipe or a device)")
    if not os.path.isdir(data):
        raise CommandError(f"--data {data!r} does not exist (a JSONL file of pairs, or a "
                           "directory from 'grapheme generate')")
    name = "train.jsonl" if command == "train" else "val.jsonl"
    path = os.path.join(data, name)
    if os.path.lexists(path) and not os.path.isfile(path):   # was "without train.jsonl"
        raise CommandError(f"--data {data!r} holds {name} as other than a regular file")
    if not os.path.isfile(path):
        raise CommandError(f"--data {data!r} is a directory without {name}; {command} "
                           f"--data takes a JSONL file or a directory holding {name}")
    return path


def _cmd_segment(args, out):
    if args.errors == "replace":   # TEXT arguments too, as bytes.decode would read them
        args.texts = [t.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
                      if _is_encodable(t) else t for t in args.texts]
    _check_arguments_text(args.texts, "TEXT")
    if args.sep is not None and args.format == "jsonl":   # ignored, unsaid (a new user's find)
        raise CommandError("--sep goes with --format text (jsonl gives each text's segments "
                           "as a list)")
    if args.format == "text":   # its output is a line a text (a helper's find: split)
        broken = next((i for i, t in enumerate(args.texts, 1) if "\n" in t), None)
        if broken is not None:
            raise CommandError(f"TEXT {broken} holds a line break, and the output is one "
                               "line a text: give its lines as TEXTs of their own, or on "
                               "standard input (--format jsonl keeps it in one text)")
        if args.sep is not None and "\n" in args.sep:   # so is --sep's (it was taken)
            raise CommandError("--sep holds a line break, and the output is one line a "
                               "text: choose another --sep, or --format jsonl for the "
                               "segments as a list")
    sep = " " if args.sep is None else args.sep
    max_line = args.max_line_bytes or (MAX_LINE_BYTES_JSONL if args.format == "jsonl" else
                                       MAX_LINE_BYTES_WORDS if args.words else MAX_LINE_BYTES)
    _check_arguments_text([sep], "--sep")
    model = _load_model(args.model)
    files = [t for t in args.texts if os.path.isfile(t)]
    if files:   # "grapheme segment --model M in.txt" segmented the name (a new user's find)
        _warn(f"{PROG} segment: note: {files[0]!r} is segmented as text, not read: a file's "
              f"lines are read from standard input (< {shlex.quote(files[0])})")
    write = out.write
    unseen = _Unseen(model)

    def segmented(texts):   # pieces of the texts' output, each text ending with a newline
        if args.words:   # the characters the model reads: its words'
            read = set()
            pieces = (_json_lines(model, texts, read) if args.format == "jsonl"
                      else model._split_words(texts, sep, "\n", read))
            unseen.add(read)
            return pieces
        unseen.add(set().union(*map(set, texts)))
        if args.format == "jsonl":
            return _json_lines(model, texts)
        return (piece for piece, _ in model._joined(texts, sep, "\n"))
    if args.texts:
        for piece in segmented(args.texts):
            write(piece)
    else:
        if sys.stdin is None:   # started with <&-
            raise CommandError("standard input is closed: give the texts as arguments")
        stdin = getattr(sys.stdin, "buffer", sys.stdin)   # bytes: decoded here
        _check_not_reading_its_output(stdin, out)
        for i, texts in enumerate(_line_batches(stdin, args.batch_chars, errors=args.errors,
                                                max_line=max_line)):
            if i == 0 and texts and texts[0].startswith("\ufeff"):   # a BOM, as load_pairs
                texts[0] = texts[0][1:]
            for piece in segmented(texts):
                write(piece)
            out.flush()
    unseen.note()
    return 0


class _Unseen:
    """The characters of ``segment``'s input that ``model`` has no row for
    (never seen in training), said once at the end: each is the unknown
    row, so a script the model never saw came back whole, unsaid (a data
    scientist's find). With ``--words``, the characters of the words the
    model reads, as the segmenter found them (an attack helper's find: read
    from the text apart, the note named marks outside any word, a letter
    and its mark that lowercasing composes, and syllables where the model
    read decomposed Hangul's jamo). A set per batch, in C."""

    def __init__(self, model):
        self.known = frozenset(model.embedding.codes.tolist())
        self.seen, self.unseen = set(), set()

    def add(self, chars):
        """Note the characters of the set ``chars``, read by the model."""
        new = chars - self.seen
        self.seen |= new
        self.unseen |= {c for c in new if ord(c) not in self.known}

    def note(self):
        n = len(self.unseen)
        if n:
            shown = ", ".join(repr(c) for c in sorted(self.unseen)[:5]) + (
                ", ..." if n > 5 else "")
            what = ("1 distinct character of the input was" if n == 1
                    else f"{n} distinct characters of the input were")
            _warn(f"{PROG} segment: note: {what} never seen in training ({shown}): the model "
                  "reads " + ("it as the" if n == 1 else "them all as one") +
                  " unknown character")


def _json_lines(model, texts, read=None):
    """``segment --format jsonl``: a JSON line per text (see its help); with
    ``read`` (a set: ``--words``), of the texts' words, whose characters
    ``read`` gets."""
    import json

    import numpy as np

    if read is not None:
        spans = model._word_spans(texts, read)
        objs = ({"words": [t[a:b] for a, b in s], "spans": s}
                for t, s in zip(texts, (s.tolist() for s in spans)))
    else:   # one inference pass for both (boundaries, then scores, ran two)
        texts = model._texts(texts)[0]
        offsets, is_start, scores = model._scored(texts)
        bounds = list(zip(offsets[:-1].tolist(), offsets[1:].tolist()))
        starts = [np.flatnonzero(is_start[a:b]).tolist() for a, b in bounds]
        objs = ({"segments": [t[a:b] for a, b in zip(s, s[1:] + [len(t)])], "starts": s,
                 "scores": scores[a:b].tolist()}
                for t, s, (a, b) in zip(texts, starts, bounds))
    return [json.dumps(o, ensure_ascii=False) + "\n" for o in objs]


def _check_not_reading_its_output(stdin, out):
    """Refuse standard input that is the output file with text ahead of the
    read position (``segment < f >> f``: each line read was written again
    ahead of the reader, until the disk was full), as ``cat`` does."""
    try:
        src, dst = os.fstat(stdin.fileno()), os.fstat(out.fileno())
        position = os.lseek(stdin.fileno(), 0, os.SEEK_CUR)
    except (AttributeError, OSError, ValueError):   # not files: pipes, StringIO
        return
    if (stat.S_ISREG(dst.st_mode) and (src.st_dev, src.st_ino) == (dst.st_dev, dst.st_ino)
            and position < dst.st_size):
        raise CommandError("standard input is the output file: what segment writes would "
                           "be read again, without end")


def _load_model(path):
    """The :class:`~grapheme.Segmenter` of ``--model``; what is wrong with
    it named as ``--model``'s (a run directory: which files in it are)."""
    from .segmenter import Segmenter

    _existing_file(path, "--model", "model file", ("best.npz", "checkpoint.npz", "model.npz"),
                   "a model file from Segmenter.save, or a run's checkpoint.npz or best.npz")
    try:
        return Segmenter.load(path)
    except ValueError as exc:
        raise CommandError(f"--model: {exc}") from None


def _checkpoint_file(path, option):
    """``path``, a checkpoint file, or an error naming ``option``."""
    return _existing_file(path, option, "checkpoint file", ("checkpoint.npz",),
                          "a run's checkpoint.npz or best.npz")


def _existing_file(path, option, kind, names, expected):
    """``path`` if it is an existing file, else an error naming ``option``:
    for a directory, which of ``names`` it holds; for a missing path, what
    was ``expected``."""
    if os.path.isdir(path):
        found = [os.path.join(path, n) for n in names if os.path.isfile(os.path.join(path, n))]
        raise CommandError(f"{option} {path!r} is a directory, not a {kind}"
                           + (f" (it holds {', '.join(found)})" if found else ""))
    try:
        os.stat(path)
    except FileNotFoundError:
        raise CommandError(f"{option} {path!r} does not exist ({expected})") from None
    except OSError as exc:   # a directory not searchable, a name too long: not "missing"
        raise CommandError(f"{option} {path!r}: {exc.strerror}") from None
    return path


def _is_encodable(text):
    """Whether ``text`` is bytes Python decoded with ``surrogateescape``
    (an argument's), so encoding it back gives those bytes."""
    try:
        text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return False
    return True


def _check_arguments_text(texts, what):
    """Refuse command-line text that is not UTF-8 (Python hands such bytes
    over as lone surrogates, which no model reads)."""
    from ._validation import _SURROGATE

    for number, text in enumerate(texts, 1):
        found = _SURROGATE.search(text)
        if found is not None:
            bad = found.group()
            byte = (f"the byte 0x{ord(bad) - 0xDC00:02x}" if "\udc80" <= bad <= "\udcff"
                    else repr(bad))
            which = f"{what} {number}" if what == "TEXT" else what
            raise CommandError(f"{which} is not valid UTF-8 ({byte} at position "
                               f"{found.start()})")


def _line_batches(stream, chars, name="standard input", errors="strict",
                  max_line=MAX_LINE_BYTES, option="--max-line-bytes"):
    """Lists of the lines of ``stream`` (without their newlines), about
    ``chars`` characters each, read as they come: nothing waits for the end
    of the stream but the last batch, and a read returns what is there
    (``read1`` of a binary stream). A binary stream is decoded as UTF-8;
    a line ends at ``\n`` (``\r\n`` too, its ``\r`` dropped), never at a
    lone ``\r``, so that the output has a line for every input line, as
    ``wc -l`` counts them and as errors number them; bytes that are not
    UTF-8 are a :class:`CommandError` naming the line, after the batches
    of the lines before it (``errors="replace"``: each is read as U+FFFD,
    as ``bytes.decode`` does). A line longer than a batch is read whole
    (in chunks joined once: linear in its length), up to ``max_line``
    bytes (characters of a text stream; a ``\r\n``'s ``\r`` counted): a
    longer one is a :class:`CommandError` naming its number and ``option``,
    after the batches of the lines before it."""
    read = getattr(stream, "read1", stream.read)
    # reads of at most max_line: a line that starts and ends in one is
    # within it, and one that does not is measured as it is carried over
    chars = min(chars, max_line)
    pending, line = [], 1   # the unfinished line's chunks; the next line's number
    held = 0                # their length
    while True:
        chunk = read(chars)
        if not chunk:
            break
        newline = b"\n" if isinstance(chunk, bytes) else "\n"
        cut = chunk.rfind(newline)
        # the line carried over, if it grows beyond max_line
        if held + (len(chunk) if cut < 0 else chunk.find(newline)) > max_line:
            unit = "bytes" if isinstance(chunk, bytes) else "characters"
            raise CommandError(f"{name}: line {line} is longer than {option} ({max_line} "
                               f"{unit}); a line is held whole while it is segmented: a "
                               f"larger {option} reads it")
        if cut < 0:
            pending.append(chunk)
            held += len(chunk)
            continue
        pending.append(chunk[:cut])
        block = chunk[:0].join(pending)
        pending = [chunk[cut + 1:]]
        held = len(pending[0])
        first, line = line, line + block.count(chunk[cut:cut + 1]) + 1
        batches, block = _decoded_lines(block, first, name, errors=errors), None   # once
        yield from batches
    block = pending[0][:0].join(pending) if pending else ""
    if block:
        yield from _decoded_lines(block, line, name, ended=False, errors=errors)


def _decoded_lines(block, line, name, ended=True, errors="strict"):
    """Yield the lines of ``block`` (str, or UTF-8 bytes whose first line is
    number ``line``) as one list; bytes that are not UTF-8: the lines before
    theirs, then a :class:`CommandError` naming the line. ``ended``: a
    ``\n`` followed the block (cut there), so a ``\r`` it ends with was a
    ``\r\n``'s; at the end of the stream it is a lone ``\r``, kept."""
    if isinstance(block, str):
        yield block.split("\n")
        return
    try:
        text = block.decode("utf-8", errors)
    except UnicodeDecodeError as exc:
        bad = line + block.count(b"\n", 0, exc.start)
        good = block.rfind(b"\n", 0, exc.start)
        if good >= 0:   # the lines before it are fine: theirs first
            yield from _decoded_lines(block[:good], line, name)
        raise CommandError(f"{name} is not valid UTF-8: line {bad} holds the byte "
                           f"0x{block[exc.start]:02x} ({exc.reason}); grapheme reads "
                           f"UTF-8 text (--errors replace reads such bytes as U+FFFD)") from None
    del block
    if "\r" in text:   # \r\n ends a line; a lone \r is a character of one
        if ended and text.endswith("\r"):   # the \r of a \r\n whose \n ended the block
            text = text[:-1]
        text = text.replace("\r\n", "\n")
    lines, text = text.split("\n"), None
    yield lines


def _cmd_plot(args, out):
    from .plot import _is_metrics_log, plot_run, read_metrics

    read_metrics(args.run)     # the run's errors before the picture's (read again below)
    if args.out is None:
        base = args.run if os.path.isdir(args.run) else os.path.dirname(args.run)
        target = os.path.join(base, "metrics.png")
        if os.path.exists(target) and not args.overwrite:
            raise CommandError(f"{target!r} already exists (--overwrite replaces it, "
                               "--out writes another file)")
    else:
        target = args.out
        if _is_metrics_log(target, args.run):   # --overwrite or not
            raise CommandError(f"--out {args.out!r} is the run's metrics log, which the "
                               "picture is drawn from")
    target = _picture_path(target, "metrics.png", args.overwrite)
    print(f"wrote {plot_run(args.run, target, overwrite=args.overwrite)}", file=out)
    return 0


def _cmd_show(args, out):
    from .plot import plot_segments

    _check_arguments_text([args.text], "TEXT")
    if "\n" in args.text:   # one line, drawn and printed (it was taken, printed
        # over lines and drawn with rows out of place: an attack helper's find); a
        # line ends at a newline alone, as segment's lines and matplotlib's do
        raise CommandError("TEXT holds a line break: show draws one line of text")
    target = _picture_path(args.out, "segments.png", args.overwrite)
    model = _load_model(args.model)
    path = plot_segments(model, args.text, target, overwrite=args.overwrite, words=args.words)
    print(" | ".join((model.words if args.words else model.segment)(args.text)), file=out)
    print(f"wrote {path}", file=out)
    return 0


def _picture_path(out, name, overwrite):
    """The file a picture's ``--out`` names: ``out``, or ``out/name`` when
    ``out`` is a directory. Refused: an existing file without
    ``overwrite``, a directory in its place, a directory that is missing."""
    if _ends_with_separator(out) and not os.path.isdir(out):
        # "pictures/": a directory, and it is missing
        raise CommandError(f"--out {out!r}: the directory {out!r} does not exist")
    path = os.path.join(out, name) if os.path.isdir(out) else out
    if os.path.isdir(path):
        raise CommandError(f"--out {out!r}: {path!r} is a directory")
    try:
        check_png(path)   # before "exists", and before the picture's work
    except ValueError as exc:   # named as the option, not as plot's argument "out"
        message = str(exc)
        raise CommandError("--" + message if message.startswith("out ") else message) from None
    if os.path.exists(path) and not overwrite:
        raise CommandError(f"--out {out!r}: {path!r} already exists (--overwrite "
                           "replaces it)" if path != out else
                           f"--out {path!r} already exists (--overwrite replaces it)")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise CommandError(f"--out {out!r}: the directory {parent!r} does not exist")
    return path


def format_table(headers, rows):
    """Render rows (lists of cells) as a plain-text table with a rule."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)




def _demo_run(estimator, pairs, extra, epochs, seed):
    """Train one estimator on the demo pairs plus ``extra``; its table row."""
    trainer = _make_trainer(dim=32, seed=seed, estimator=estimator, target_rate=None,
                            lr=3e-3, batch_size=8, log=None, progress=False)
    # The extra generated folds teach the rule (merge the last two); the demo
    # pairs are repeated so they weigh as much as the rest.
    reps = max(1, len(extra) // (4 * len(pairs)))
    history = trainer.fit(pairs * reps + extra, epochs)
    inputs = [a for a, _ in pairs]
    segments = trainer.model.segment(inputs)
    per_input = ["|".join(s) for s in segments]
    scores = trainer.evaluate(pairs)
    merges = sum(map(len, inputs)) - sum(map(len, segments))
    return {"estimator": estimator, "first_loss": history[0]["loss"],
            "final_loss": history[-1]["loss"], "merges": merges,
            "tau": trainer.morpher.tau, "accuracy": scores["accuracy"],
            "segments": dict(zip(inputs, per_input))}


def _cmd_demo(args, out):
    pairs = list(_data.DEMO_PAIRS)
    # only folds: the demo pairs are folds, and dedup contradicts fold on a
    # doubled letter ("abbc": dedup merges "bb", fold merges "bc")
    extra = _data.make_pairs(96, seed=args.seed, tasks="fold")
    _note_busy_cores("demo")
    start = time.perf_counter()
    print(f"Training on {len(pairs)} demo pairs "
          f"({', '.join(f'{a}->{b}' for a, b in pairs)}) plus {len(extra)} generated "
          f"fold pairs, {args.epochs} epochs per estimator.\n", file=out)
    results = [_demo_run(e, pairs, extra, args.epochs, args.seed)
               for e in ESTIMATORS]
    headers = ["estimator", "first loss", "final loss", "merges made",
               "threshold tau", "exact"]
    rows = [[r["estimator"], f"{r['first_loss']:.4f}", f"{r['final_loss']:.4f}",
             f"{r['merges']}", f"{r['tau']:.4f}",
             f"{round(r['accuracy'] * len(pairs))}/{len(pairs)}"] for r in results]
    print(format_table(headers, rows), file=out)
    print("\n".join([
        "",
        "first loss, final loss: the structural loss in the first and the last epoch "
        "(0: the morph is the target)",
        f"merges made: neighbouring characters merged in the {len(pairs)} demo inputs, "
        f"right or wrong ({sum(len(a) - len(b) for a, b in pairs)} right ones make every "
        "target; exact counts the inputs merged right)",
        "threshold tau: neighbours whose similarity exceeds tau merge",
        f"exact: demo inputs (of {len(pairs)}) whose morph has exactly the target's "
        "nodes (their number and characters)",
        "history passes exact gradients through the merges to the features, none to "
        "the merge decisions, so it cannot learn new merges; reinforce estimates them "
        "from samples, noisily at this budget",
    ]), file=out)
    print("\nLearned segmentations (| separates merged nodes):", file=out)
    seg_rows = [[r["estimator"]] + [f"{a} -> {r['segments'][a]}" for a, _ in pairs]
                for r in results]
    print(format_table(["estimator"] + [f"target {b}" for _, b in pairs], seg_rows),
          file=out)
    print(f"\n({time.perf_counter() - start:.1f} s)", file=out)
    return 0


_COMMANDS = {"generate": _cmd_generate, "train": _cmd_train, "eval": _cmd_eval,
             "segment": _cmd_segment, "plot": _cmd_plot, "show": _cmd_show,
             "demo": _cmd_demo}


def main(argv=None, *, prog=PROG):
    """Run the ``grapheme`` command; return the exit status.

    Parameters
    ----------
    argv : list of str, optional
        Arguments without the program name; defaults to ``sys.argv[1:]``.
    prog : str, optional
        How the command was started, for its usage lines and the command
        it prints to resume an interrupted run: ``"python -m grapheme"``
        where ``python -m`` started it.

    Returns
    -------
    int
        0 on success, 2 on a usage or input error (one line on stderr),
        130 when interrupted (128 + the signal's number when stopped by
        one: see :func:`run`), 1 when the reader of the output closed it
        (``| head``; quietly).
    """
    parser = build_parser(prog)
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        _check_options(parser, argv)
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse has printed its usage message
        return exc.code if isinstance(exc.code, int) else 2
    args.argv, args.prog = argv, prog   # for the ranks of train --nproc
    try:
        if sys.stdout is None:   # started with >&-
            raise CommandError("standard output is closed")
        stdout = _Output(sys.stdout)
        code = _COMMANDS[args.command](args, stdout)
        stdout.flush()   # a reader gone is found here, not at exit
        return code
    except BrokenPipeError:   # e.g. | head: the reader has what it wanted
        return _reader_gone()
    except KeyboardInterrupt as exc:
        signum = getattr(exc, "signum", signal.SIGINT)
        what = ("interrupted" if signum == signal.SIGINT
                else f"stopped by {signal.Signals(signum).name}")
        _warn(f"{PROG}: {what}" + (f"; {exc}" if str(exc) else ""))
        return 128 + signum
    except (CommandError, ValueError, OSError, FloatingPointError, MemoryError,
            ImportError) as exc:
        if args.traceback:   # for a bug report; the status stays an error's
            traceback.print_exc()
            return 2
        # the first line with words (matplotlib's begin with a newline)
        message = next((line for line in str(exc).splitlines() if line.strip()),
                       type(exc).__name__)
        if isinstance(exc, MemoryError):
            message = f"out of memory: {message}"
        if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
            message = f"{exc.strerror}: {exc.filename!r}"
        _warn(f"{PROG} {args.command}: error: {message}")
        return 2


#: Linux's count of the threads running now (``_others_running``).
LOADAVG = "/proc/loadavg"


def _others_running(reads=5, pause=0.01):
    """How many threads other than this one are running or waiting for a
    core now, machine-wide: the median of ``reads`` reads of the running
    count in ``/proc/loadavg`` (an instant, not the load average, which
    still holds a run that ended a minute ago), less this thread; None
    without ``/proc/loadavg`` (not Linux)."""
    counts = []
    for _ in range(reads):
        try:
            with open(LOADAVG, encoding="ascii") as f:
                running = int(f.read().split()[3].partition("/")[0])
        except (OSError, ValueError, IndexError):
            return None
        counts.append(max(running - 1, 0))
        time.sleep(pause)
    return sorted(counts)[len(counts) // 2]


def _note_busy_cores(command):
    """A note on standard error, for a person at a terminal, when other
    programs hold cores that grapheme's OpenMP threads need: they wait for
    each other by spinning, so one without a core holds up the rest, and an
    epoch can take ten times as long (README, "Threads"; a new user's
    trial measured 15.1 s against 1.5 s with ``OMP_NUM_THREADS=1``). Said
    nowhere else: a log, a pipe or a test reads no advice."""
    from . import _core

    threads = _core.openmp_threads()
    if threads < 2 or not _isatty(sys.stderr):
        return
    # the cores this process may run on (OpenMP's count follows them; a
    # cpuset or taskset gives fewer than the machine's)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
        os.cpu_count() or 1)
    others = _others_running()
    if others is None or cores - others >= threads:
        return
    free = max(cores - others, 1)
    _warn(f"{PROG} {command}: note: {others} other thread{'s' * (others != 1)} "
          f"{'want' if others != 1 else 'wants'} the {cores} cores grapheme's {threads} "
          "threads run on; they wait for each other, and one without a core can make "
          f"training many times slower: OMP_NUM_THREADS={free} may be faster (README, "
          "\"Threads\")")


def _isatty(stream):
    try:
        return stream is not None and stream.isatty()
    except (AttributeError, ValueError):   # a closed or a bare stream
        return False


def _warn(line):
    """``line`` on standard error, if it can be written: a full or closed
    one (``2>/dev/full``) leaves the exit status to speak (an error here
    turned a command's message into a traceback)."""
    if sys.stderr is None:   # started with 2>&- (print would take stdout)
        return
    try:
        print(line, file=sys.stderr, flush=True)
    except (OSError, ValueError):   # ValueError: a closed file
        pass


class _Output:
    """A command's standard output: an error writing it (a full disk,
    ``>/dev/full``) is named as standard output's, where it read as the
    command's own ("No space left on device" after generate had written
    its files). A reader gone (``| head``) stays a BrokenPipeError."""

    def __init__(self, stream):
        self._stream = stream

    def _guard(self, call, *args):
        try:
            return call(*args)
        except BrokenPipeError:
            raise
        except OSError as exc:
            raise CommandError(f"cannot write standard output: {exc.strerror or exc}"
                               ) from None
        except UnicodeEncodeError as exc:   # PYTHONIOENCODING=ascii, a cp1252 console:
            # "'ascii' codec can't encode" named nothing (a helper's find)
            raise CommandError(f"cannot write standard output: its encoding "
                               f"{exc.encoding!r} has no {exc.object[exc.start]!r}; "
                               "PYTHONIOENCODING=utf-8 writes UTF-8") from None

    def write(self, text):
        return self._guard(self._stream.write, text)

    def flush(self):
        return self._guard(self._stream.flush)

    def __getattr__(self, name):   # fileno, isatty, encoding, ...
        return getattr(self._stream, name)


def _commands(parser):
    """The parsers of ``parser``'s commands, by name."""
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def _check_options(parser, argv):
    """Refuse an option the command does not have, with the command's usage
    and the nearest option it has (``--estimater`` -> ``--estimator``),
    before argparse does: it would print the top-level usage, or, for a
    mistyped required option, report only the required one missing. A
    unique prefix of an option (argparse's abbreviation) passes; an option's
    value is never taken for an option (only tokens before ``--`` that start
    with ``--`` are looked at, and a value of that form is argparse's to
    refuse)."""
    commands = _commands(parser)
    command = next((tok for tok in argv if tok in commands), None)
    if command is None:
        return
    sub = commands[command]
    known = [opt for opt in sub._option_string_actions if opt.startswith("--")]
    for tok in argv[argv.index(command) + 1:]:
        if tok == "--":
            return
        if not tok.startswith("--"):
            continue
        name = tok.split("=", 1)[0]
        if any(opt.startswith(name) for opt in known):
            continue
        near = _nearest(name, known)
        sub.error(f"unrecognized option {name}"
                  + (f"; did you mean {near}?" if near else ""))


#: One command's name for what another calls otherwise (a model file is
#: ``eval``'s ``--checkpoint`` and ``segment``'s ``--model``).
_SYNONYMS = {"--model": "--checkpoint", "--checkpoint": "--model"}


def _nearest(name, known):
    """The option of ``known`` a mistyped ``name`` most likely meant: the one
    option having it as a word (``--layers`` -> ``--encoder-layers``), its
    synonym, else the closest spelling (``--help`` aside), or None."""
    word = name.lstrip("-")
    having = [opt for opt in known if word in opt.lstrip("-").split("-")]
    if len(having) == 1:
        return having[0]
    if _SYNONYMS.get(name) in known:
        return _SYNONYMS[name]
    near = difflib.get_close_matches(name, [opt for opt in known if opt != "--help"], n=1)
    return near[0] if near else None


def _reader_gone():
    """Exit quietly when the reader of our output has closed it (``|
    head -1``), as Python's documentation recommends (signal, "Note on
    SIGPIPE"): what is still buffered for it goes to ``os.devnull``, so
    that Python's own flush at exit does not fail again with a traceback.
    Status 1, the status Python's recipe exits with."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    for stream in (sys.stdout, sys.stderr):   # 2>&1 | head: both are the pipe
        try:
            os.dup2(devnull, stream.fileno())
        except (AttributeError, OSError, ValueError):   # not a file (captured)
            pass
    os.close(devnull)
    return 1


def _rank_command(argv, prog=PROG):
    """The argv of one rank of ``--nproc``: this Python, running the grapheme
    this process runs, as the command ``prog`` (which its usage lines and
    the command it prints to resume name). ``python -m grapheme.cli`` would
    import whatever ``grapheme`` the working directory holds first, in a
    source checkout the uncompiled folder."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    boot = (f"import sys; sys.path.insert(0, {root!r}); "
            f"from grapheme.cli import run; sys.exit(run(prog={prog!r}))")
    return [sys.executable, "-c", boot, *argv]


class Stopped(KeyboardInterrupt):
    """A stop signal (``signum``: SIGTERM from ``kill`` or a scheduler,
    SIGHUP from a closed terminal) raised as Ctrl-C is, so that a run ends
    as an interrupted one does: its lock and half-written files removed, the
    command that resumes it said; the status is then ``128 + signum``."""

    def __init__(self, signum, *args):
        super().__init__(*args)
        self.signum = signum


def _raise_stopped(signum, frame):
    # after the first stop signal the run ends as an interrupted one, and a
    # second would interrupt that ending: its resume command unsaid, a
    # traceback at exit (an attack helper's find: five SIGTERMs in a row).
    # Ctrl-C stays Python's: a second one forces the end, as is usual
    for sig in _STOP_SIGNALS:
        if signal.getsignal(sig) is _raise_stopped:
            signal.signal(sig, signal.SIG_IGN)
    raise Stopped(signum)


def run(prog=PROG):
    """The ``grapheme`` console script: :func:`main` with the process's
    arguments (and ``prog``), and the stop signals raised as
    :class:`Stopped` (not where the process ignores them: ``nohup``'s
    SIGHUP stays ignored). Only here, in the process the command owns; not
    by :func:`main`, which a program may call."""
    if threading.current_thread() is not threading.main_thread():
        return main(prog=prog)
    installed = [sig for sig in _STOP_SIGNALS if signal.getsignal(sig) is signal.SIG_DFL]
    for sig in installed:
        signal.signal(sig, _raise_stopped)
    try:
        return main(prog=prog)
    finally:
        # the command has ended: the default again, so a stop signal during
        # the interpreter's own ending ends it quietly (Stopped raised in its
        # shutdown printed a traceback: a launcher stopping a rank that was
        # exiting, an attack helper's find); not ignored, which a process
        # that goes on, and its children, would keep
        for sig in installed:
            signal.signal(sig, signal.SIG_DFL)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run())
