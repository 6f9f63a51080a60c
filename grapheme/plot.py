"""Pictures of a run and of a model's segments (``grapheme plot``, ``grapheme show``).

matplotlib is an optional dependency (the ``plot`` extra),
imported only when a picture is drawn, and only its object-oriented API
(``Figure`` on the Agg canvas): nothing here touches pyplot's global state
or the user's backend. Pictures are written atomically, and an existing
file is only replaced when asked (``overwrite=True``).
"""
import errno
import json
import os

import numpy as np

from ._validation import check_bool, check_path, check_scalar
from .train.metrics import upgrade_record

__all__ = ["read_metrics", "plot_run", "plot_segments"]

#: What a missing matplotlib says.
INSTALL_HINT = ('drawing needs matplotlib: pip install matplotlib (the "plot" extra: '
                'pip install ".[plot]" in a checkout)')

#: Longest text :func:`plot_segments` draws (one artist per segment piece).
MAX_SHOW_CHARS = 2000


def _figure(width, height):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(INSTALL_HINT) from None
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def check_png(out):
    """``out`` (a path) as a str, refused unless it ends with ``.png``
    (ValueError naming it: the picture is a PNG, and a name that says
    otherwise would mislead) and is not a directory (IsADirectoryError).
    Checked before the work."""
    out = check_path(out, "out")
    if os.path.isdir(out):
        raise IsADirectoryError(errno.EISDIR, "is a directory, not the PNG file to write",
                                out)
    if os.path.splitext(out)[1].lower() != ".png":
        raise ValueError(f"out {out!r} must be a .png file: the picture is a PNG")
    return out


def _save(fig, out, overwrite):
    from .checkpoint import _atomic_open

    out = check_png(out)
    overwrite = check_bool(overwrite, "overwrite")
    if not overwrite and os.path.exists(out):
        raise FileExistsError(f"{out!r} already exists (overwrite=True, or --overwrite, "
                              "replaces it)")
    directory = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"directory {directory!r} does not exist")
    with _atomic_open(out, "wb") as f:
        fig.savefig(f, format="png")
    return out


def _metrics_path(run):
    """The metrics log of ``run``: its ``metrics.jsonl``, or ``run`` itself."""
    run = check_path(run, "run")
    return os.path.join(run, "metrics.jsonl") if os.path.isdir(run) else run


def _is_metrics_log(out, run):
    """Whether writing ``out`` would replace ``run``'s metrics log (the same
    file, through any path or link)."""
    try:
        return os.path.samefile(out, _metrics_path(run))
    except OSError:   # either does not exist
        return False


def read_metrics(run):
    """The epoch records of a run: ``run`` is its directory (holding
    ``metrics.jsonl``) or the JSONL file. Records of older logs are
    converted (``merge_rate`` becomes ``kept_fraction``).

    Raises
    ------
    FileNotFoundError
        If there is no such file.
    ValueError
        If a line is not a JSON object with an ``epoch``, or there is none.
    """
    path = _metrics_path(run)
    if os.path.exists(path) and not os.path.isfile(path):
        raise ValueError(f"{path!r} is not a regular file (a pipe or a device)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no metrics file {path!r} (RUN is a run directory "
                                "holding metrics.jsonl, or that file)")
    records = []
    with open(path, "rb") as f:
        if f.read(4) == b"PK\x03\x04":   # a zip: an .npz, not the run's log
            raise ValueError(f"{path!r} is a checkpoint or model (.npz), not a metrics "
                             "file: pass the run directory or its metrics.jsonl")
        f.seek(0)
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(f"{path!r} line {number} is not valid UTF-8 "
                                 f"({exc.reason} at byte {exc.start})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as exc:
                raise ValueError(f"{path!r} line {number} is not JSON: {exc}") from None
            if not isinstance(record, dict) or not isinstance(record.get("epoch"), int):
                raise ValueError(f"{path!r} line {number} is not an epoch record")
            # an integer beyond float's range (a hand-edited log) raised
            # OverflowError in the drawing: named here instead
            big = [k for k, v in record.items() if isinstance(v, int) and abs(v) >= 2**1024]
            if big:
                raise ValueError(f"{path!r} line {number}: {big[0]} is beyond the range of a "
                                 f"float")
            records.append(upgrade_record(record))
    if not records:
        raise ValueError(f"{path!r} holds no epoch records")
    return records


def _series(records, key):
    """``(epochs, values)`` of the records that have a number for ``key``."""
    pts = [(r["epoch"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return np.array([p[0] for p in pts]), np.array([p[1] for p in pts], dtype=float)


#: The four panels of :func:`plot_run`: a title and the record keys drawn.
_PANELS = (("loss", ("loss", "node", "edge", "clique", "val_loss")),
           ("validation accuracy", ("val_accuracy", "val_seg_accuracy", "val_boundary_f1")),
           ("kept fraction (output / input nodes)", ("kept_fraction", "val_kept_fraction")),
           ("threshold tau", ("tau",)))


def _panels(records):
    """What :func:`plot_run` draws: per panel of :data:`_PANELS`, its title
    and ``(label, epochs, values)`` per curve the log has.

    A curve equal to an earlier one of its panel at every epoch is not drawn
    over it: the earlier one's label names both, as ``"loss = node"`` (the
    loss of ``StructuralLoss.for_training()`` is its node term alone) or
    ``"val_accuracy = val_seg_accuracy"`` (equal on segmentation data). The
    validation panel's title names the boundary F1 when the log has one.

    Examples
    --------
    >>> recs = [{"epoch": 1, "loss": 0.5, "node": 0.5, "edge": 0.1, "tau": 0.7}]
    >>> for title, curves in _panels(recs):
    ...     print(f"{title}: {[label for label, x, y in curves]}")
    loss: ['loss = node', 'edge']
    validation accuracy: []
    kept fraction (output / input nodes): []
    threshold tau: ['tau']
    """
    out = []
    for title, keys in _PANELS:
        curves = []
        for key in keys:
            x, y = _series(records, key)
            if not x.size:
                continue
            same = next((i for i, (_, cx, cy) in enumerate(curves)
                         if np.array_equal(cx, x) and np.array_equal(cy, y)), None)
            if same is None:
                curves.append((key, x, y))
            else:
                label, cx, cy = curves[same]
                curves[same] = (f"{label} = {key}", cx, cy)
        if "val_boundary_f1" in keys and any("val_boundary_f1" in c[0] for c in curves):
            title += " and boundary F1"
        out.append((title, curves))
    return out


#: The largest magnitude :func:`plot_run` draws: an axis's limits, with
#: their margins, must stay within float's range.
_DRAWABLE = 1e300


def plot_run(run, out, overwrite=False):
    """Draw a run's metrics per epoch to the PNG file ``out``.

    Four panels: the training loss and its terms (and the validation loss),
    validation accuracy (and boundary F1, for segmentation), the kept
    fraction (training and validation) and the threshold ``tau``; see
    :func:`_panels`.

    Parameters
    ----------
    run : str or os.PathLike
        A run directory holding ``metrics.jsonl``, or that file.
    out : str or os.PathLike
        The PNG file to write (a name ending in .png; ValueError otherwise).
    overwrite : bool, default False
        Replace an existing ``out``; without it, ``FileExistsError``. Never
        the run's own metrics log (ValueError).

    Returns
    -------
    str
        ``out``.
    """
    run, out = check_path(run, "run"), check_path(out, "out")
    if _is_metrics_log(out, run):
        raise ValueError(f"out {out!r} is the run's metrics log, which the "
                         "picture is drawn from")
    check_png(out)
    records = read_metrics(run)
    panels = _panels(records)
    for _, curves in panels:   # else matplotlib's "arange: cannot compute length"
        for label, x, y in curves:
            for what, v in (("epoch", x), (label, y)):
                v = np.abs(v[np.isfinite(v)])
                if v.size and v.max() > _DRAWABLE:
                    raise ValueError(f"{what} {v.max():g} in {_metrics_path(run)!r} is "
                                     f"beyond what a plot can draw (at most {_DRAWABLE:g})")
    fig = _figure(10, 7)
    from matplotlib.ticker import MaxNLocator

    axes = fig.subplots(2, 2).ravel()
    for ax, (title, curves) in zip(axes, panels):
        for label, x, y in curves:
            ax.plot(x, y, marker="." if x.size < 50 else None, label=label)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if curves:
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "not in this log", ha="center", va="center",
                    transform=ax.transAxes, color="gray")
    fig.tight_layout()
    return _save(fig, out, overwrite)


def plot_segments(model, text, out, overwrite=False, width=60, words=False):
    """Draw ``text`` with its segments under ``model`` as coloured spans.

    Parameters
    ----------
    model : Segmenter
    text : str
        At most :data:`MAX_SHOW_CHARS` characters.
    out : str or os.PathLike
        The PNG file to write (a name ending in .png; ValueError otherwise).
    overwrite : bool, default False
        Replace an existing ``out``; without it, ``FileExistsError``.
    width : int, default 60
        Characters per drawn line (1 to :data:`MAX_SHOW_CHARS`).
    words : bool, default False
        Raw text, for a model trained on words: the pieces of its words
        (:meth:`Segmenter.word_spans`), the characters between them
        (spaces, punctuation) drawn uncoloured.

    Returns
    -------
    str
        ``out``.
    """
    from .segmenter import Segmenter

    if not isinstance(model, Segmenter):
        raise TypeError(f"model must be a grapheme.Segmenter, got {type(model).__name__}")
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    if not 0 < len(text) <= MAX_SHOW_CHARS:
        raise ValueError(f"text must have 1 to {MAX_SHOW_CHARS} characters, got "
                         f"{len(text)}")
    out = check_png(out)
    words = check_bool(words, "words")
    width = check_scalar(width, "width", lower=1, upper=MAX_SHOW_CHARS, integer=True)
    n = len(text)
    if words:   # the pieces, and the gaps between them
        spans = model.word_spans(text)
        starts, marks = spans[:, 0], spans.reshape(-1)
    else:
        starts = marks = model.boundaries(text)
    # pieces: segments cut where a drawn line ends
    cuts = np.union1d(marks, np.arange(0, n, width))
    cuts = cuts[cuts < n]
    ends = np.append(cuts[1:], n)
    segment_of = np.searchsorted(starts, cuts, side="right") - 1
    coloured = segment_of >= 0
    if words and len(spans):   # inside the piece that starts before it
        coloured &= cuts < spans[np.maximum(segment_of, 0), 1]
    rows = -(-n // width)
    fig = _figure(max(3.0, 0.16 * min(n, width) + 0.6), 0.45 * rows + 0.8)
    ax = fig.add_axes((0.02, 0.02, 0.96, 0.96 - 0.4 / (0.45 * rows + 0.8)))
    ax.set_xlim(-0.5, min(n, width) + 0.5)
    ax.set_ylim(rows, -0.6)
    ax.axis("off")
    colors = [f"C{i}" for i in range(10)]
    for a, b, s, c in zip(cuts.tolist(), ends.tolist(), segment_of.tolist(),
                          coloured.tolist()):
        box = ({"boxstyle": "square,pad=0.15", "facecolor": colors[s % 10], "alpha": 0.35,
                "edgecolor": colors[s % 10]} if c else None)
        # the text as written: "$2^{10}$" is not matplotlib's mathtext
        ax.text(a % width, a // width, text[a:b], family="monospace", fontsize=11,
                va="top", ha="left", bbox=box, parse_math=False)
    what = "pieces of its words" if words else "segments"
    fig.suptitle(f"{len(starts)} {what} of {n} characters (tau {model.morpher.tau:.3f})",
                 fontsize=10)
    return _save(fig, out, overwrite)
