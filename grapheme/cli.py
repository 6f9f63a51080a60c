"""The ``grapheme`` command: generate data, train, evaluate, demo.

Usage::

    grapheme generate --out data/generated [--n-train N] [--n-val N] [--seed S]
                      [--tasks dedup fold ...]
    grapheme generate --task words [--corpus FILE ...] --out data/words [--seed S]
    grapheme train --data DIR --epochs N --out RUN [--batch-size B] [--lr LR]
                   [--seed S] [--estimator NAME] [--target-rate R] [--resume CKPT]
                   [--keep-best METRIC] [--overwrite]
    grapheme eval --checkpoint RUN/checkpoint.npz --data FILE
    grapheme demo

Errors in the input (a missing directory, a malformed data line, a corrupted
checkpoint, not enough memory for the settings) print one line to stderr and
exit with status 2. Nothing is written before the arguments, the data and
the checkpoint to resume have been checked. ``train`` never replaces a run
already in ``--out`` (a ``metrics.jsonl`` or ``checkpoint.npz`` there)
unless told: ``--resume OUT/checkpoint.npz`` continues it, ``--overwrite``
replaces it.
"""
import argparse
import os
import sys
import time

from . import data as _data
from .estimators import ESTIMATORS
from ._validation import check_scalar
from .train.metrics import SEGMENTATION_KEYS

__all__ = ["main"]

PROG = "grapheme"
DEFAULT_ESTIMATOR = "ste"
#: Message-passing layers before the merge in ``train`` and ``demo``.
ENCODER_LAYERS = 2


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


_positive_int = _number(int, lower=1)
_nonneg_int = _number(int, lower=0)
_positive_float = _number(float, lower=0, lower_inclusive=False)
_rate = _number(float, lower=0.0, upper=1.0)


def build_parser():
    """The argument parser of the ``grapheme`` command."""
    parser = argparse.ArgumentParser(
        prog=PROG, description="Vocabulary-free text models whose graph changes shape.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("generate", help="write a data set (JSONL): generated tasks, or "
                                        "word segmentation of real text")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--task", default=None, choices=("words",),
                   help="'words': word segmentation of real text (--corpus, default the "
                        "Python standard library's docstrings) split by document into "
                        "train/val/test; without it, a mix of generated tasks (--tasks)")
    p.add_argument("--corpus", nargs="+", default=None, metavar="FILE",
                   help="UTF-8 text files for --task words, one document each")
    p.add_argument("--n-train", type=_nonneg_int, default=None,
                   help="generated pairs in train.jsonl (default 2000)")
    p.add_argument("--n-val", type=_nonneg_int, default=None,
                   help="generated pairs in val.jsonl (default 200)")
    p.add_argument("--seed", type=_nonneg_int, default=0)
    p.add_argument("--tasks", nargs="+", default=None,
                   choices=sorted(_data.TASKS),
                   help=f"tasks to mix (default: {' '.join(_data.DEFAULT_TASKS)}); "
                        "'arithmetic' is a control a morph cannot express (a morph only "
                        "keeps characters of its input), so it is only mixed in by name")

    p = sub.add_parser("train", help="train a model on DIR/train.jsonl")
    p.add_argument("--data", required=True,
                   help="directory with train.jsonl (and optionally val.jsonl)")
    p.add_argument("--epochs", type=_positive_int, required=True,
                   help="total number of epochs (including resumed ones)")
    p.add_argument("--out", required=True,
                   help="run directory: receives metrics.jsonl and checkpoint.npz")
    p.add_argument("--batch-size", type=_positive_int, default=None,
                   help="pairs per step (default 32)")
    p.add_argument("--lr", type=_positive_float, default=None,
                   help="Adam learning rate (default 0.01)")
    p.add_argument("--seed", type=_nonneg_int, default=None,
                   help="seed of embedding and shuffling (default 0)")
    p.add_argument("--dim", type=_positive_int, default=None,
                   help="embedding dimension (default 64)")
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
    p.add_argument("--target-rate", type=_rate, default=None,
                   help="target compression rate (output nodes / input nodes) of "
                        "the rate penalty")
    p.add_argument("--resume", default=None,
                   help="continue from this checkpoint; the model settings come "
                        "from it")
    p.add_argument("--keep-best", default=None, metavar="METRIC",
                   help="keep OUT/best.npz, the checkpoint with the best value of this "
                        "validation metric (e.g. val_boundary_f1, val_accuracy, val_loss), "
                        "the untrained model's included; needs DIR/val.jsonl")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a run already in --out (without it, an existing run is "
                        "only continued with --resume OUT/checkpoint.npz)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("eval", help="loss, exact-structure accuracy (and segmentation "
                                    "metrics) of a checkpoint beside the untrained model's")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True, help="a JSONL file of pairs")
    p.add_argument("--batch-size", type=_positive_int, default=None)

    p = sub.add_parser("demo", help="train on built-in data and print what was learned")
    p.add_argument("--epochs", type=_positive_int, default=150)
    p.add_argument("--seed", type=_nonneg_int, default=0)
    return parser


# --------------------------------------------------------------------- commands
def _cmd_generate(args, out):
    if args.task == "words":
        given = [flag for flag, value in (("--n-train", args.n_train),
                                          ("--n-val", args.n_val), ("--tasks", args.tasks))
                 if value is not None]
        if given:
            raise CommandError(f"{', '.join(given)} cannot be combined with --task words: "
                               "the corpus decides the number of examples")
        start = time.perf_counter()
        paths = _data.generate_words(args.out, corpus=args.corpus, seed=args.seed)
        corpus = ("the standard library's docstrings" if args.corpus is None
                  else f"{len(args.corpus)} file(s)")
        print(f"word segmentation of {corpus}, split by document "
              f"({time.perf_counter() - start:.1f} s):", file=out)
        for split in ("train", "val", "test"):
            n = paths["sizes"][split]
            print(f"  {paths[split]}: {n['examples']} examples, {n['words']} words, "
                  f"{n['characters']} characters from {n['documents']} documents", file=out)
        print(f"  which document went where: {paths['documents']}", file=out)
        return 0
    if args.corpus is not None:
        raise CommandError("--corpus needs --task words")
    n_train = 2000 if args.n_train is None else args.n_train
    n_val = 200 if args.n_val is None else args.n_val
    tasks = list(_data.DEFAULT_TASKS) if args.tasks is None else args.tasks
    paths = _data.generate(args.out, n_train=n_train, n_val=n_val, seed=args.seed,
                           tasks=tasks)
    print(f"wrote {n_train} pairs to {paths['train']} and {n_val} pairs "
          f"to {paths['val']}", file=out)
    return 0


def _make_trainer(*, dim, seed, estimator, target_rate, lr, batch_size, log, progress,
                  baseline="mean", samples=1, overwrite=False, encoder_layers=2):
    from .embedding import Embedding
    from .loss import StructuralLoss
    from .morph import Morpher
    from .optim import Adam
    from .train import Trainer

    from .estimators import Reinforce, make_estimator

    try:
        if estimator == "reinforce":
            estimator = Reinforce(baseline=None if baseline == "none" else baseline,
                                  samples=samples)
        elif samples != 1:
            raise ValueError(f"--samples needs --estimator reinforce, got {estimator!r}")
        morpher = Morpher(estimator=make_estimator(estimator), rate=target_rate)
    except (TypeError, ValueError) as exc:
        raise CommandError(str(exc)) from None
    from .encoder import Encoder

    encoder = Encoder(dim, layers=encoder_layers) if encoder_layers else None
    return Trainer(Embedding(dim=dim, seed=seed), morpher, StructuralLoss.for_training(),
                   Adam(lr=lr),
                   batch_size=batch_size, seed=seed, log=log, progress=progress,
                   overwrite=overwrite, encoder=encoder)


def _cmd_train(args, out):
    from .train import Trainer

    if args.resume is not None:
        fixed = [f"--{name.replace('_', '-')}" for name in
                 ("batch_size", "lr", "seed", "dim", "estimator", "baseline", "samples",
                  "target_rate", "encoder_layers")
                 if getattr(args, name) is not None]
        if fixed:
            raise CommandError(f"{', '.join(fixed)} cannot be combined with --resume: "
                               "the settings come from the checkpoint")
    if not os.path.isdir(args.data):
        what = ("is a file; train --data takes the directory holding train.jsonl "
                "(and val.jsonl)" if os.path.isfile(args.data) else "does not exist")
        raise CommandError(f"data directory {args.data!r} {what}")
    train_path = os.path.join(args.data, "train.jsonl")
    val_path = os.path.join(args.data, "val.jsonl")
    if not os.path.isfile(train_path):
        raise CommandError(f"{train_path!r} does not exist (run 'grapheme generate')")
    pairs = _data.load_pairs(train_path)
    if not pairs:
        raise CommandError(f"{train_path!r} holds no pairs")
    val = _data.load_pairs(val_path) if os.path.isfile(val_path) else None
    log = os.path.join(args.out, "metrics.jsonl")
    checkpoint = os.path.join(args.out, "checkpoint.npz")
    _check_run_directory(args, log, checkpoint)
    progress = not args.no_progress
    if args.resume is not None:
        trainer = Trainer.from_checkpoint(args.resume, log=log, progress=progress)
        start = trainer.epoch
    else:
        trainer = _make_trainer(
            dim=64 if args.dim is None else args.dim,
            seed=0 if args.seed is None else args.seed,
            estimator=DEFAULT_ESTIMATOR if args.estimator is None else args.estimator,
            target_rate=args.target_rate,
            baseline="mean" if args.baseline is None else args.baseline,
            samples=1 if args.samples is None else args.samples,
            lr=1e-2 if args.lr is None else args.lr,
            batch_size=32 if args.batch_size is None else args.batch_size,
            log=log, progress=progress, overwrite=args.overwrite,
            encoder_layers=ENCODER_LAYERS if args.encoder_layers is None
            else args.encoder_layers)
        start = 0
    best = None
    if args.keep_best is not None:
        if not val:
            raise CommandError(f"--keep-best needs validation pairs in {val_path!r}")
        try:
            best = trainer._check_keep_best(args.keep_best, None, val, checkpoint)
        except ValueError as exc:
            raise CommandError(f"--keep-best: {exc}") from None
    # the model training starts from, measured once: printed beside the result
    before = trainer.evaluate(val) if val and start < args.epochs else None
    os.makedirs(args.out, exist_ok=True)   # only now: everything above is checked
    history = trainer.fit(pairs, args.epochs, val=val or None, checkpoint=checkpoint,
                          keep_best=args.keep_best)
    if len(history) > start:
        first, last = history[start], history[-1]
        line = (f"epochs {start + 1}-{last['epoch']}: loss {first['loss']:.4f} -> "
                f"{last['loss']:.4f}, merge rate {last['merge_rate']:.3f}, "
                f"tau {last['tau']:.4f}")
        print(line, file=out)
        if before is not None:
            what = "untrained" if start == 0 else f"epoch {start}"
            headers = ["validation", what, f"epoch {last['epoch']}"]
            if trainer.best is not None:
                headers.append(f"best (epoch {trainer.best['epoch']})")
                kept = (trainer.history[trainer.best["epoch"] - 1]
                        if trainer.best["epoch"] > start else
                        {"val_" + k: v for k, v in before.items()})
            rows = []
            for key in ("loss", "merge_rate", "accuracy", *SEGMENTATION_KEYS):
                if key in before:
                    row = [key, f"{before[key]:.4f}", f"{last['val_' + key]:.4f}"]
                    if trainer.best is not None:
                        row.append(f"{kept['val_' + key]:.4f}")
                    rows.append(row)
            print(format_table(headers, rows), file=out)
    else:
        print(f"nothing to do: the checkpoint already has {start} epochs", file=out)
    print(f"metrics: {log}\ncheckpoint: {checkpoint}", file=out)
    if best is not None and trainer.best is not None:
        print(f"best: {best} (epoch {trainer.best['epoch']}, {trainer.best['metric']} "
              f"{trainer.best['value']:.4f})", file=out)
    return 0


def _check_run_directory(args, log, checkpoint):
    """Refuse an ``--out`` that is a file, or that holds a run this command
    would replace without ``--overwrite`` (continuing it with ``--resume``
    of its own checkpoint is fine)."""
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise CommandError(f"--out {args.out!r} exists and is not a directory")
    best = os.path.join(os.path.dirname(checkpoint), "best.npz")
    existing = [os.path.basename(p) for p in (checkpoint, log, best) if os.path.exists(p)]
    if not existing or args.overwrite:
        return
    if args.resume is not None and os.path.exists(checkpoint) and os.path.exists(
            args.resume) and os.path.samefile(args.resume, checkpoint):
        return
    raise CommandError(
        f"--out {args.out!r} already holds a run ({', '.join(existing)}); pass --resume "
        f"{checkpoint} to continue it or --overwrite to replace it")


def _cmd_eval(args, out):
    from .train import Trainer

    if not os.path.isfile(args.data):
        what = ("is a directory; eval --data takes one JSONL file, e.g. val.jsonl"
                if os.path.isdir(args.data) else "does not exist")
        raise CommandError(f"data file {args.data!r} {what}")
    pairs = _data.load_pairs(args.data)
    if not pairs:
        raise CommandError(f"{args.data!r} holds no pairs")
    trainer = Trainer.from_checkpoint(args.checkpoint, progress=False)
    result = trainer.evaluate(pairs, batch_size=args.batch_size)
    # the untrained model of the same configuration, for comparison
    untrained = _untrained(trainer).evaluate(pairs, batch_size=args.batch_size)
    print(f"pairs {len(pairs)}", file=out)
    rows = [[key, f"{result[key]:.6f}", f"{untrained[key]:.6f}"]
            for key in ("loss", "node", "edge", "clique", "merge_rate", "accuracy",
                        *SEGMENTATION_KEYS) if key in result]
    print(format_table(["metric", f"epoch_{trainer.epoch}", "untrained"], rows), file=out)
    return 0


def _untrained(trainer):
    """A fresh trainer of ``trainer``'s configuration (the same seeds): the
    model before its first step."""
    return type(trainer)._from_config(trainer.config(), progress=False)


def format_table(headers, rows):
    """Render rows (lists of cells) as a plain-text table with a rule."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)




def _demo_run(estimator, pairs, extra, epochs, seed):
    """Train one estimator on the demo pairs plus ``extra``; its table row."""
    from .graph import Graph

    trainer = _make_trainer(dim=32, seed=seed, estimator=estimator, target_rate=None,
                            lr=3e-3, batch_size=8, log=None, progress=False)
    # The extra generated folds teach the rule (merge the last two); the demo
    # pairs are repeated so they weigh as much as the rest.
    reps = max(1, len(extra) // (4 * len(pairs)))
    history = trainer.fit(pairs * reps + extra, epochs)
    inputs = [a for a, _ in pairs]
    g = Graph.from_texts(inputs)
    encoded = trainer._encode(g, trainer.embedding.forward(g.labels))[0]
    morphed = trainer.morpher.predict(g, *encoded)
    heads_graph = _graph_heads(g, morphed.history)
    segs = morphed.history.segments("".join(inputs))
    per_input = ["|".join(s for s, h in zip(segs, heads_graph) if h == b)
                 for b in range(len(inputs))]
    scores = trainer.evaluate(pairs)
    merges = g.num_nodes - morphed.history.num_outputs
    return {"estimator": estimator, "first_loss": history[0]["loss"],
            "final_loss": history[-1]["loss"], "merges": merges,
            "tau": trainer.morpher.tau, "accuracy": scores["accuracy"],
            "segments": dict(zip(inputs, per_input))}


def _graph_heads(g, history):
    import numpy as np

    return (np.searchsorted(g.graph_offsets, history.heads, side="right") - 1).tolist()


def _cmd_demo(args, out):
    pairs = list(_data.DEMO_PAIRS)
    # only folds: the demo pairs are folds, and dedup contradicts fold on a
    # doubled letter ("abbc": dedup merges "bb", fold merges "bc")
    extra = _data.make_pairs(96, seed=args.seed, tasks="fold")
    start = time.perf_counter()
    print(f"Training on {len(pairs)} demo pairs "
          f"({', '.join(f'{a}->{b}' for a, b in pairs)}) plus {len(extra)} generated "
          f"fold pairs, {args.epochs} epochs per estimator.\n", file=out)
    results = [_demo_run(e, pairs, extra, args.epochs, args.seed)
               for e in ESTIMATORS]
    headers = ["estimator", "first loss", "final loss", "merges learned",
               "threshold tau", "exact"]
    rows = [[r["estimator"], f"{r['first_loss']:.4f}", f"{r['final_loss']:.4f}",
             f"{r['merges']}", f"{r['tau']:.4f}",
             f"{round(r['accuracy'] * len(pairs))}/{len(pairs)}"] for r in results]
    print(format_table(headers, rows), file=out)
    print("\nLearned segmentations (| separates merged nodes):", file=out)
    seg_rows = [[r["estimator"]] + [f"{a} -> {r['segments'][a]}" for a, _ in pairs]
                for r in results]
    print(format_table(["estimator"] + [f"target {b}" for _, b in pairs], seg_rows),
          file=out)
    print(f"\n({time.perf_counter() - start:.1f} s)", file=out)
    return 0


_COMMANDS = {"generate": _cmd_generate, "train": _cmd_train, "eval": _cmd_eval,
             "demo": _cmd_demo}


def main(argv=None):
    """Run the ``grapheme`` command; return the exit status.

    Parameters
    ----------
    argv : list of str, optional
        Arguments without the program name; defaults to ``sys.argv[1:]``.

    Returns
    -------
    int
        0 on success, 2 on a usage or input error (one line on stderr),
        130 when interrupted.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse has printed its usage message
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return _COMMANDS[args.command](args, sys.stdout)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except (CommandError, ValueError, OSError, FloatingPointError, MemoryError) as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if isinstance(exc, MemoryError):
            message = f"out of memory: {message}"
        if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
            message = f"{exc.strerror}: {exc.filename!r}"
        print(f"{PROG} {args.command}: error: {message}", file=sys.stderr)
        return 2


def run():
    """The ``grapheme`` console script: :func:`main` with the process's
    arguments."""
    return main()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run())
