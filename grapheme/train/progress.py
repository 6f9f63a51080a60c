"""What training reports while it runs: a progress bar or one line per epoch.

In a terminal or a notebook a ``tqdm.auto`` bar counts the steps and shows
the last epoch's metrics in its postfix; anywhere else (``nohup``, CI, a
pipe, a file) one line per epoch is written instead, since a bar redrawn in
a log file is unreadable. Both end with a summary beside the untrained
model's validation metrics (:attr:`grapheme.Trainer.baseline`).
"""
import sys

__all__ = ["Progress", "epoch_line", "summary_line"]

#: The metrics an epoch line shows, in order, when the record has them.
LINE_KEYS = ("loss", "kept_fraction", "tau", "val_loss", "val_kept_fraction",
             "val_accuracy", "val_seg_accuracy", "val_boundary_f1")


def _in_notebook():
    """Whether we run in a Jupyter kernel (its stderr is no terminal, yet
    it draws tqdm's notebook bar)."""
    ipython = sys.modules.get("IPython")
    get = getattr(ipython, "get_ipython", None)
    shell = get() if callable(get) else None
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


def _fmt(value):
    if value is None:
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def epoch_line(record, epochs):
    """One line for an epoch record: its metrics and its time.

    Examples
    --------
    >>> epoch_line({"epoch": 2, "loss": 0.5, "kept_fraction": 0.75, "tau": 0.7,
    ...             "time": 1.25}, 10)
    'epoch 2/10: loss 0.5000, kept_fraction 0.7500, tau 0.7000 (1.2 s)'
    """
    parts = [f"{k} {_fmt(record[k])}" for k in LINE_KEYS if k in record]
    return (f"epoch {record['epoch']}/{epochs}: {', '.join(parts)} "
            f"({record.get('time', 0.0):.1f} s)")


def summary_line(history, start, baseline, seconds):
    """The summary of epochs ``start + 1 ..`` of ``history``: the training
    loss, and every validation metric beside the untrained model's.

    Examples
    --------
    >>> h = [{"epoch": 1, "loss": 2.0, "val_loss": 1.5}, {"epoch": 2, "loss": 1.0,
    ...       "val_loss": 1.25}]
    >>> summary_line(h, 0, {"val_loss": 1.75}, 3.0)
    'trained epochs 1-2 in 3.0 s: loss 2.0000 -> 1.0000; validation, untrained -> epoch 2: val_loss 1.7500 -> 1.2500'
    """
    first, last = history[start], history[-1]
    line = (f"trained epochs {first['epoch']}-{last['epoch']} in {seconds:.1f} s: "
            f"loss {first['loss']:.4f} -> {last['loss']:.4f}")
    if baseline:
        pairs = [f"{k} {_fmt(baseline[k])} -> {_fmt(last.get(k))}"
                 for k in LINE_KEYS if k in baseline]
        line += f"; validation, untrained -> epoch {last['epoch']}: {', '.join(pairs)}"
    return line


class Progress:
    """Reports of one :meth:`~grapheme.Trainer.fit` call on ``stream``
    (default ``sys.stderr``): ``mode`` ``"bar"``, ``"lines"`` or None
    (silent); ``"auto"`` picks the bar in a terminal or a notebook."""

    def __init__(self, mode, total_steps, epochs, stream=None):
        self.stream = sys.stderr if stream is None else stream
        if self.stream is None:   # started with 2>&-: nowhere to report
            mode = None
        if mode == "auto":
            isatty = getattr(self.stream, "isatty", None)
            mode = "bar" if (isatty is not None and isatty()) or _in_notebook() else "lines"
        self.mode = mode if total_steps > 0 else None
        self.epochs = epochs
        self.bar = None
        if self.mode == "bar":
            from tqdm.auto import tqdm
            self._report(self._open_bar, tqdm, total_steps)

    def _open_bar(self, tqdm, total_steps):
        self.bar = tqdm(total=total_steps, unit="step", dynamic_ncols=True, file=self.stream)

    def _report(self, write, *args):
        """``write(*args)``; if the stream cannot be written (a full disk,
        ``2>/dev/full``, a closed descriptor), the reports stop and training
        goes on: they are not its results (an error here stopped a run after
        its first epoch, without a word: found by an attack helper)."""
        try:
            write(*args)
        except (OSError, ValueError) as exc:
            if isinstance(exc, ValueError) and "closed file" not in str(exc):
                raise
            self.mode, self.bar = None, None

    def step(self):
        if self.bar is not None:
            self._report(self.bar.update, 1)

    def epoch(self, record):
        if self.bar is not None:
            self._report(self._describe, record)
        elif self.mode == "lines":
            self._report(self._print, epoch_line(record, self.epochs))

    def close(self, summary=None):
        if self.bar is not None:
            self._report(self.bar.close)
            self.bar = None
        if summary is not None and self.mode is not None:
            self._report(self._print, summary)

    def _describe(self, record):
        self.bar.set_description(f"epoch {record['epoch']}/{self.epochs}")
        self.bar.set_postfix({k: _fmt(record[k]) for k in LINE_KEYS if k in record
                              and k != "tau"})

    def _print(self, line):
        print(line, file=self.stream, flush=True)
