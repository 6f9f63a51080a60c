"""Tests for the ``grapheme`` command line (grapheme.cli.main)."""
import json
import os
import re
import sys

import numpy as np
import pytest

import grapheme as gr
from grapheme.estimators import ESTIMATORS
from grapheme.cli import format_table, main
from grapheme.data import load_pairs as load_pairs
from grapheme.train import TIMING_KEYS


def run(capsys, *argv):
    code = main(list(map(str, argv)))
    out, err = capsys.readouterr()
    return code, out, err


def read_log(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.fixture
def level1(tmp_path, capsys):
    data = tmp_path / "data"
    code, out, _ = run(capsys, "generate", "--out", data, "--n-train", 64, "--n-val", 16,
                       "--seed", 1, "--tasks", "arithmetic")
    assert code == 0 and "wrote 64 pairs" in out
    return data


def test_generate_writes_files(level1):
    lines = (level1 / "train.jsonl").read_text().splitlines()
    assert len(lines) == 64
    assert all(json.loads(x)["input"].startswith("(") for x in lines)


@pytest.mark.parametrize("estimator", [None, "soft", "ste", "reinforce"],
                         ids=["default", "soft", "ste", "reinforce"])
def test_full_training_reduces_loss(level1, tmp_path, capsys, estimator):
    """``grapheme train --data DIR --epochs 100``: a sustained decrease (the
    last 10 epochs' mean below 0.8x the first epoch's) on level-1 arithmetic."""
    run_dir = tmp_path / "run"
    flags = [] if estimator is None else ["--estimator", estimator]
    code, out, err = run(capsys, "train", "--data", level1, "--epochs", 100, "--out",
                         run_dir, "--no-progress", *flags)
    assert code == 0, err
    log = read_log(run_dir / "metrics.jsonl")
    assert len(log) == 100
    losses = np.array([r["loss"] for r in log])
    assert losses[-10:].mean() < 0.8 * losses[0], (losses[0], losses[-10:].mean())


def test_full_training_history_estimator_still_descends(level1, tmp_path, capsys):
    """The history estimator cannot learn *when* to merge (theta gets no
    gradient, DESIGN.md), so on arithmetic, where the loss is mostly the
    size mismatch that only merging removes, it can only shave the
    activation costs: measured last-10 mean / first = 0.985. What it must
    still do is descend, never climb (the failure this library ends)."""
    run_dir = tmp_path / "run"
    code, out, err = run(capsys, "train", "--data", level1, "--epochs", 100, "--out",
                         run_dir, "--no-progress", "--estimator", "history")
    assert code == 0, err
    # nothing on stderr, but the result and its time on stdout
    assert "epoch" not in err and re.search(r"epochs 1-100 in [0-9.]+ s: loss ", out)
    losses = np.array([r["loss"] for r in read_log(run_dir / "metrics.jsonl")])
    assert losses[-10:].mean() < losses[0]
    assert losses[-1] < losses[0]


def test_new_data_needs_resume(level1, tmp_path, capsys):
    # found by a new-user helper: accepted, and ignored
    code, _, err = run(capsys, "train", "--data", level1, "--epochs", 1, "--out",
                       tmp_path / "a", "--new-data")
    assert code == 2 and "--new-data goes with --resume" in err
    assert not (tmp_path / "a").exists()


def test_train_resume_and_eval(level1, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert run(capsys, "train", "--data", level1, "--epochs", 4, "--out", a,
               "--batch-size", 16, "--lr", 0.02, "--seed", 3)[0] == 0
    assert run(capsys, "train", "--data", level1, "--epochs", 2, "--out", b,
               "--batch-size", 16, "--lr", 0.02, "--seed", 3)[0] == 0
    code, out, _ = run(capsys, "train", "--data", level1, "--epochs", 4, "--out", b,
                       "--resume", b / "checkpoint.npz")
    assert code == 0 and "epochs 3-4" in out

    def strip(log):
        return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in log]

    assert strip(read_log(a / "metrics.jsonl")) == strip(read_log(b / "metrics.jsonl"))
    with np.load(a / "checkpoint.npz") as fa, np.load(b / "checkpoint.npz") as fb:
        for key in ("embedding.weight", "morpher.theta"):
            np.testing.assert_array_equal(fa[key], fb[key])
    # one more epoch: its loss alone, not "epochs 5-5: loss X -> X"
    code, out, _ = run(capsys, "train", "--data", level1, "--epochs", 5, "--out", b,
                       "--resume", b / "checkpoint.npz")
    loss = read_log(b / "metrics.jsonl")[-1]["loss"]
    assert code == 0 and re.match(rf"epoch 5 in [0-9.]+ s: loss {loss:.4f}, kept", out)

    code, out, err = run(capsys, "eval", "--checkpoint", a / "checkpoint.npz",
                         "--data", level1 / "val.jsonl")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == f"evaluated: 16 pairs from {level1 / 'val.jsonl'}"
    assert lines[1].split() == ["metric", "untrained", "epoch", "4"]
    values = {line.split()[0]: line.split()[2] for line in lines[3:]}   # the checkpoint's
    assert 0.0 <= float(values["accuracy"]) <= 1.0 and float(values["loss"]) > 0


def test_errors_exit_2_with_one_line(level1, tmp_path, capsys):
    code, out, err = run(capsys, "train", "--data", tmp_path / "missing", "--epochs", 1,
                         "--out", tmp_path / "r")
    assert code == 2 and err.count("\n") == 1
    assert "--data" in err and "does not exist" in err and "Traceback" not in err
    for argv in (("--traceback", "train"), ("train", "--traceback")):   # for a bug report
        code, _, err = run(capsys, *argv, "--data", tmp_path / "missing", "--epochs", 1,
                           "--out", tmp_path / "r")
        assert code == 2 and err.startswith("Traceback (most recent call last):\n")
        assert err.endswith("does not exist (a JSONL file of pairs, or a directory from "
                            "'grapheme generate')\n") and "CommandError" in err
    # a message that starts with a newline (matplotlib's): its first words,
    # not an empty "error: " (an attack helper's find)
    import grapheme.cli as cli

    def raises(args, out):
        raise ValueError("\n  \nmathtext: bad input\n  ^")
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(cli._COMMANDS, "plot", raises)
        code, _, err = run(capsys, "plot", tmp_path)
    assert (code, err) == (2, "grapheme plot: error: mathtext: bad input\n")

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "train.jsonl").write_text('{"input": "ab", "target": "a"}\n{"input": "ab"\n')
    code, _, err = run(capsys, "train", "--data", bad, "--epochs", 1, "--out",
                       tmp_path / "r")
    assert code == 2 and err.count("\n") == 1
    assert f"{bad / 'train.jsonl'}:2: invalid JSON" in err

    ckpt = tmp_path / "r2" / "checkpoint.npz"
    assert run(capsys, "train", "--data", level1, "--epochs", 1, "--out", ckpt.parent)[0] == 0
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) - 100])
    for argv in (("eval", "--checkpoint", ckpt, "--data", level1 / "val.jsonl"),
                 ("train", "--data", level1, "--epochs", 2, "--out", ckpt.parent,
                  "--resume", ckpt)):
        code, _, err = run(capsys, *argv)
        assert code == 2 and err.count("\n") == 1
        assert "is corrupted or truncated" in err and str(ckpt) in err

    code, _, err = run(capsys, "eval", "--checkpoint", tmp_path / "none.npz",
                       "--data", level1 / "val.jsonl")
    assert code == 2 and "does not exist" in err

    code, _, err = run(capsys, "train", "--data", level1, "--epochs", 2, "--out",
                       tmp_path / "r3", "--resume", ckpt, "--seed", 1)
    assert code == 2 and "--seed cannot be combined with --resume" in err

    code, _, err = run(capsys, "train", "--data", level1, "--epochs", 1, "--out",
                       tmp_path / "r4", "--estimator", "magic")
    assert code == 2 and "estimator" in err


def test_resume_with_another_learning_rate(level1, tmp_path, capsys):
    """What the divergence message advises: resume the good checkpoint with
    a smaller learning rate. The run continues as a trainer loaded from the
    checkpoint whose lr is then set does, and records the new lr."""
    from grapheme.train import Trainer

    out = tmp_path / "run"
    assert run(capsys, "train", "--data", level1, "--epochs", 1, "--out", out,
               "--no-progress")[0] == 0
    first = tmp_path / "first.npz"
    first.write_bytes((out / "checkpoint.npz").read_bytes())
    code, text, _ = run(capsys, "train", "--data", level1, "--epochs", 2, "--out", out,
                        "--resume", out / "checkpoint.npz", "--lr", 1e-4, "--no-progress")
    assert code == 0 and "learning rate 0.003 -> 0.0001 from epoch 2" in text
    resumed = Trainer.from_checkpoint(out / "checkpoint.npz", progress=False)
    assert resumed.epoch == 2 and resumed.optimizer.lr == 1e-4
    by_hand = Trainer.from_checkpoint(first, progress=False)
    by_hand.optimizer.lr = 1e-4
    by_hand.fit(load_pairs(level1 / "train.jsonl"), 2)
    for name, value in by_hand._params().items():
        np.testing.assert_array_equal(resumed._params()[name], value, err_msg=name)


@pytest.mark.parametrize("argv", [[], ["train"], ["train", "--data", "x", "--epochs", "0",
                                                   "--out", "y"], ["frobnicate"]])
def test_usage_errors(capsys, argv):
    code, _, err = run(capsys, *argv)
    assert code == 2 and "usage:" in err


@pytest.mark.parametrize("argv, near", [
    (["train", "--data", "d", "--estimater", "soft", "--epochs", "1", "--out", "r"],
     "--estimater; did you mean --estimator?"),
    # a mistyped required option is named, not only the required one missing
    (["segment", "--modle", "m.npz", "abc"], "--modle; did you mean --model?"),
    (["train", "--data", "d", "--epocs", "5", "--out", "r"], "--epocs; did you mean --epochs?"),
    (["demo", "--zzzzzz"], "--zzzzzz"),
    # an option's word (the Python API's layers=), and one command's name
    # for another's (found by a new-user helper: "did you mean --lr?",
    # "did you mean --help?")
    (["train", "--data", "d", "--layers", "2", "--out", "r"],
     "--layers; did you mean --encoder-layers?"),
    (["eval", "--model", "m.npz", "--data", "d"], "--model; did you mean --checkpoint?"),
    (["segment", "--checkpoint", "m.npz", "abc"], "--checkpoint; did you mean --model?"),
])
def test_a_mistyped_option_is_named_with_its_command(capsys, argv, near):
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert err.startswith(f"usage: grapheme {argv[0]} ")
    assert err.rstrip().endswith(f"grapheme {argv[0]}: error: unrecognized option {near}")


def test_option_checks_leave_abbreviations_and_values_after_the_marker(capsys, tmp_path):
    # a unique prefix is argparse's abbreviation; after "--" nothing is an option
    code, _, err = run(capsys, "train", "--data", tmp_path / "none", "--epoch", "1",
                       "--out", tmp_path / "r")
    assert code == 2 and "does not exist" in err
    code, _, err = run(capsys, "segment", "--model", tmp_path / "m.npz", "--", "--weird")
    assert code == 2 and "does not exist" in err


def test_demo(capsys):
    code, out, err = run(capsys, "demo")
    assert code == 0, err
    assert "estimator" in out and "final loss" in out and "merges made" in out
    for estimator in ESTIMATORS:
        assert f"\n{estimator} " in out
    assert "abc -> " in out and "xyz -> " in out and "123 -> " in out


def test_format_table():
    table = format_table(["a", "long header"], [["x", 1], ["yyyy", 22]])
    assert table.splitlines() == ["a     long header", "----  -----------",
                                  "x     1", "yyyy  22"]


def test_console_script_runs_main(monkeypatch):
    import grapheme.cli as cli
    calls = []
    monkeypatch.setattr(cli, "main", lambda argv=None, prog=None: calls.append("main") or 0)
    assert cli.run() == 0
    assert calls == ["main"]


# ------------------------------------------------------------------ words
@pytest.fixture
def words(tmp_path, capsys):
    files = []
    for i, text in enumerate(["the cat sat on the mat", "a bird in the hand is worth two",
                              "the dog ran to the park and back"]):
        f = tmp_path / f"doc{i}.txt"
        f.write_text((text + ". ") * 10, encoding="utf-8")
        files.append(f)
    data = tmp_path / "words"
    code, out, err = run(capsys, "generate", "--task", "words", "--corpus", *files,
                         "--out", data, "--seed", 2)
    assert code == 0, err
    assert "split by document" in out and "test.jsonl" in out
    # three documents: one each, which leaves train a third of the words
    assert re.search(r"\nnote: train holds 3\d% of the words: val and test take whole "
                     r"documents until each holds 10%", out)
    # and why (a new user's find: a third file changed the split unsaid)
    assert "(three or more --corpus files are a document each;" in out
    return data


def test_generate_words_of_files_without_words_cuts_paragraphs(tmp_path, capsys):
    """An attack helper's find: three files, two empty, were cut at blank
    lines as one file is, and the note said three files are a document each."""
    files = [tmp_path / f"f{i}.txt" for i in range(3)]
    files[0].write_text("", encoding="utf-8")
    files[1].write_text("42 ...\n", encoding="utf-8")
    files[2].write_text("\n\n".join(f"para{x} " * 20 for x in "abc"), encoding="utf-8")
    code, out, err = run(capsys, "generate", "--task", "words", "--corpus", *files,
                         "--out", tmp_path / "w")
    assert code == 0, err
    assert "note: train holds 3" in out and "three or more --corpus files" not in out


def test_generate_words_and_train_keep_best(words, tmp_path, capsys):
    first = json.loads((words / "train.jsonl").read_text().splitlines()[0])
    assert set(first) == {"input", "segments"}
    assert first["input"] == "".join(first["segments"])
    run_dir = tmp_path / "run"
    code, out, err = run(capsys, "train", "--data", words, "--epochs", 2, "--out", run_dir,
                         "--no-progress", "--keep-best", "val_boundary_f1")
    assert code == 0, err
    assert "untrained" in out and "boundary_f1" in out and "best: " in out
    log = read_log(run_dir / "metrics.jsonl")
    assert all("val_boundary_f1" in r for r in log)
    assert (run_dir / "best.npz").exists()
    # the untrained column is what the untrained model scores
    table = {line.split()[0]: line.split()[1:] for line in out.splitlines()
             if line.startswith(("boundary_", "seg_"))}
    code, ev, err = run(capsys, "eval", "--checkpoint", run_dir / "best.npz", "--data",
                        words / "val.jsonl")
    assert code == 0, err
    rows = {line.split()[0]: line.split()[1:] for line in ev.splitlines()
            if line.startswith(("boundary_", "seg_"))}
    assert set(rows) == {"seg_accuracy", "boundary_precision", "boundary_recall",
                         "boundary_f1"}
    for key, (untrained, _) in rows.items():
        assert float(untrained) == pytest.approx(float(table[key][0]), abs=1e-4)
    # training never ends below where it started: the best is >= the untrained
    untrained, best = (float(v) for v in rows["boundary_f1"])
    assert best >= untrained
    # an existing run with best.npz is not replaced unasked
    (run_dir / "metrics.jsonl").unlink()
    (run_dir / "checkpoint.npz").unlink()
    code, _, err = run(capsys, "train", "--data", words, "--epochs", 1, "--out", run_dir)
    assert code == 2 and "already holds a run (best.npz)" in err
    # a --resume file that does not exist is named (not "pass --resume ...")
    code, _, err = run(capsys, "train", "--data", words, "--epochs", 1, "--out", run_dir,
                       "--resume", run_dir / "nope.npz")
    assert code == 2 and "nope.npz' does not exist" in err


def test_eval_scores_a_model_file_as_its_checkpoint(words, tmp_path, capsys):
    # a new user's find: eval refused model files ("not a training
    # checkpoint"), so a saved model could not be scored from the CLI
    run_dir = tmp_path / "run"
    assert run(capsys, "train", "--data", words, "--epochs", 1, "--out", run_dir,
               "--no-progress", "--dim", 8)[0] == 0
    gr.Segmenter.load(str(run_dir / "checkpoint.npz")).save(str(tmp_path / "model.npz"))
    tables = []
    for path in (run_dir / "checkpoint.npz", tmp_path / "model.npz"):
        code, out, err = run(capsys, "eval", "--checkpoint", path, "--data",
                             words / "test.jsonl")
        assert code == 0, err
        tables.append(out)
    heads = [t.splitlines()[1].split() for t in tables]
    assert heads == [["metric", "untrained", "epoch", "1"], ["metric", "untrained", "model"]]
    assert [t.splitlines()[3:] for t in tables[:1]] == [tables[1].splitlines()[3:]]


@pytest.mark.parametrize("argv", [
    ["train", "--data", "d d", "--epochs", "3", "--out", "o", "--resume", "old.npz"],
    ["train", "--data", "d d", "--res", "old.npz", "--over", "--epochs", "3", "--out", "o"],
    ["train", "--resume=old.npz", "--data", "d d", "--epochs", "3", "--overwrite", "--out", "o"],
])
def test_the_resume_command_replaces_resume_in_any_spelling(argv):
    from grapheme.cli import _resume_command

    args = [a for a in argv if not a.startswith(("--res", "--over")) and a != "old.npz"]
    assert _resume_command(argv, "o/c k.npz") == (
        "grapheme " + " ".join(repr(a) if " " in a else a for a in args)
        + " --resume 'o/c k.npz'")


def test_the_resume_command_leaves_out_the_checkpoints_settings(level1, tmp_path, capsys):
    """An attack helper's find: after Ctrl-C a run with --dim 8 --seed 3
    printed a command that kept them, which --resume refuses."""
    from grapheme.cli import _resume_command

    out = tmp_path / "run"
    argv = ["train", "--data", str(level1), "--epochs", "2", "--out", str(out), "--dim", "8",
            "--seed=3", "--batch", "16", "--estim", "ste", "--no-progress"]
    assert run(capsys, *argv[:3], "--epochs", "1", *argv[5:])[0] == 0
    command = _resume_command(argv, str(out / "checkpoint.npz"))
    assert command == (f"grapheme train --data {level1} --epochs 2 --out {out} "
                       f"--no-progress --resume {out / 'checkpoint.npz'}")
    code, _, err = run(capsys, *command.split()[1:])
    assert code == 0, err
    # an option's other name too (--target-rate: an attack helper's find,
    # the printed command was refused)
    for alias in (["--target-rate", "0.5"], ["--target-kept=0.5"], ["--target-r", "0.5"]):
        assert _resume_command(argv[:7] + alias, "c.npz") == (
            f"grapheme train --data {level1} --epochs 2 --out {out} --resume c.npz")


@pytest.mark.parametrize("argv, message", [
    (["--task", "words", "--n-train", "5"], "--n-train cannot be combined with --task words: "
                                            "the corpus decides the number of examples"),
    # "the corpus decides the number of examples" said of --tasks too (a new user's find)
    (["--task", "words", "--tasks", "fold"], "--tasks cannot be combined with --task words: "
                                             "--tasks names generated tasks"),
    (["--corpus", "x.txt"], "--corpus needs --task words"),
    (["--task", "words", "--corpus", "missing.txt"], "--corpus 'missing.txt' is not a file"),
    # an empty train.jsonl, which train would refuse (an attack helper's find)
    (["--n-train", "0"], "--n-train"),
])
def test_generate_words_errors(tmp_path, capsys, argv, message):
    code, _, err = run(capsys, "generate", "--out", tmp_path / "d", *argv)
    assert code == 2 and message in err
    assert not (tmp_path / "d").exists()


def test_generate_never_replaces_a_data_set_unasked(tmp_path, capsys):
    data = tmp_path / "d"
    assert run(capsys, "generate", "--out", data, "--n-train", 8, "--n-val", 4)[0] == 0
    before = (data / "train.jsonl").read_bytes()
    code, _, err = run(capsys, "generate", "--out", data, "--n-train", 8, "--seed", 1)
    assert code == 2 and "already holds a data set (train.jsonl, val.jsonl)" in err
    assert (data / "train.jsonl").read_bytes() == before
    code, _, _ = run(capsys, "generate", "--out", data, "--n-train", 8, "--seed", 1,
                     "--overwrite")
    assert code == 0 and (data / "train.jsonl").read_bytes() != before


@pytest.mark.skipif(sys.platform == "win32", reason="fcntl.flock: POSIX")
def test_generate_locks_its_out(tmp_path, capsys):
    """Two generates into one --out each wrote their files, one's
    train.jsonl beside the other's val.jsonl (an attack helper's find): a
    generate holds the lock train holds, from before its look at --out."""
    from grapheme.cli import RUN_LOCK, _run_lock

    data = tmp_path / "d"
    data.mkdir()
    for command in ("generate", "train"):
        with _run_lock(str(data), command):
            code, _, err = run(capsys, "generate", "--out", data, "--n-train", 8)
        assert code == 2 and err == (
            f"grapheme generate: error: --out {str(data)!r} is being written by another "
            f"grapheme {command} (pid {os.getpid()}); wait for it, or choose another --out\n")
        assert os.listdir(data) == []
    assert run(capsys, "generate", "--out", data / "new" / "d", "--n-train", 8)[0] == 0
    assert sorted(os.listdir(data / "new" / "d")) == ["train.jsonl", "val.jsonl"]
    # refused: an --out made for it goes, and the lock with it
    code, _, err = run(capsys, "generate", "--out", data / "x" / "y", "--corpus", "no.txt")
    assert code == 2 and "--corpus needs --task words" in err
    assert sorted(os.listdir(data)) == ["new"] and RUN_LOCK not in os.listdir(data / "new" / "d")
    # a --out it cannot write is named, not its lock file (an attack helper's find)
    real_open = os.open

    def denied(path, *args, **kwargs):
        if str(path).endswith(RUN_LOCK):
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, *args, **kwargs)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "open", denied)
        code, _, err = run(capsys, "generate", "--out", data, "--n-train", 8)
    assert code == 2 and err.endswith(f"--out {str(data)!r} cannot be written: Permission "
                                      "denied\n")
    (data / RUN_LOCK).mkdir()   # the --out is writable: the lock in its way is named
    code, _, err = run(capsys, "generate", "--out", data, "--n-train", 8)
    assert code == 2 and err.endswith(f"--out {str(data)!r} holds {RUN_LOCK}, which cannot "
                                      "be opened (Is a directory): remove it if no grapheme "
                                      "command is writing --out\n")
    (data / RUN_LOCK).rmdir()
    for argv in (["generate"], ["train", "--data", "x", "--epochs", 1]):   # named alike
        code, _, err = run(capsys, *argv, "--out", "")
        assert code == 2 and "argument --out: expected a path, got an empty one" in err


def test_generate_overwrite_leaves_nothing_of_the_replaced_set(words, tmp_path, capsys):
    # generated pairs over a words set left its test.jsonl and
    # documents.json, which eval would then score (an attack helper's find)
    names = ("train.jsonl", "val.jsonl", "test.jsonl", "documents.json")
    assert all((words / name).exists() for name in names)
    code, _, err = run(capsys, "generate", "--out", words, "--n-train", 8, "--n-val", 4)
    assert code == 2 and "(train.jsonl, val.jsonl, test.jsonl, documents.json)" in err
    code, out, err = run(capsys, "generate", "--out", words, "--n-train", 8, "--n-val", 4,
                         "--overwrite")
    assert code == 0, err
    assert "removed the replaced data set's test.jsonl, documents.json" in out
    assert sorted(p.name for p in words.iterdir()) == ["train.jsonl", "val.jsonl"]
    assert len((words / "train.jsonl").read_text().splitlines()) == 8
    # a test.jsonl of the user's own, with nothing else of a data set, is
    # neither refused nor removed (a review helper's find)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "test.jsonl").write_text("my own\n")
    for flags in ((), ("--overwrite",)):
        code, out, err = run(capsys, "generate", "--out", mine, "--n-train", 8, "--n-val", 4,
                             *flags)
        assert code == 0, err
        assert "removed" not in out and (mine / "test.jsonl").read_text() == "my own\n"
    # a directory in one file's place: refused before any file is replaced
    # (the first two were, and the set was left half old, half new)
    before = (words / "train.jsonl").read_bytes()
    (words / "val.jsonl").unlink()
    (words / "val.jsonl").mkdir()
    code, _, err = run(capsys, "generate", "--out", words, "--n-train", 9, "--n-val", 4,
                       "--overwrite")
    assert code == 2 and "holds val.jsonl as other than a file: nothing was written" in err
    assert (words / "train.jsonl").read_bytes() == before


def test_keep_best_errors(words, level1, tmp_path, capsys):
    code, _, err = run(capsys, "train", "--data", level1, "--epochs", 1, "--out",
                       tmp_path / "r", "--keep-best", "val_boundary_f1")
    assert code == 2 and "--keep-best: keep_best must be one of" in err
    assert not (tmp_path / "r").exists()


def test_train_with_an_encoder(capsys, tmp_path):
    data, run_dir = tmp_path / "data", tmp_path / "run"
    assert main(["generate", "--out", str(data), "--n-train", "48", "--n-val", "8"]) == 0
    assert main(["train", "--data", str(data), "--epochs", "2", "--out", str(run_dir),
                 "--encoder-layers", "1", "--dim", "8", "--no-progress"]) == 0
    import grapheme as gr
    trainer = gr.Trainer.from_checkpoint(run_dir / "checkpoint.npz", progress=False)
    assert trainer.encoder is not None and trainer.encoder.layers == 1
    assert main(["train", "--data", str(data), "--epochs", "3", "--out", str(run_dir),
                 "--resume", str(run_dir / "checkpoint.npz"), "--encoder-layers", "1",
                 "--no-progress"]) == 2
    assert "--encoder-layers cannot be combined with --resume" in capsys.readouterr().err


def test_seed_reaches_reinforce_samples(level1, tmp_path, capsys):
    """--seed seeds REINFORCE's sample stream too (a docs reviewer's find:
    it was 0 whatever --seed said); a resumed run keeps the checkpoint's."""
    for seed in (0, 5):
        out = tmp_path / f"run{seed}"
        code, _, err = run(capsys, "train", "--data", level1, "--epochs", 1, "--out", out,
                           "--estimator", "reinforce", "--seed", seed, "--dim", 8,
                           "--encoder-layers", 0, "--no-progress")
        assert code == 0, err
        trainer = gr.Trainer.from_checkpoint(out / "checkpoint.npz", progress=False)
        assert trainer.morpher.estimator.seed == seed == trainer.seed


def test_a_val_jsonl_that_is_not_a_file_is_named(level1, tmp_path, capsys):
    """An attack helper's finds: a val.jsonl directory (or pipe) in --data
    was skipped, no validation and no word; a train.jsonl directory read as
    "a directory without train.jsonl"; --keep-best on an empty val.jsonl
    said to put val.jsonl in the directory, where it was."""
    import shutil
    data = tmp_path / "copy"
    shutil.copytree(level1, data)
    (data / "val.jsonl").unlink()
    (data / "val.jsonl").mkdir()
    code, _, err = run(capsys, "train", "--data", data, "--epochs", 1, "--out", tmp_path / "r")
    assert code == 2 and err.endswith(f"--data {str(data)!r} holds val.jsonl as other than a "
                                      "regular file\n")
    (data / "val.jsonl").rmdir()
    (data / "val.jsonl").write_text("")
    code, _, err = run(capsys, "train", "--data", data, "--epochs", 1, "--out", tmp_path / "r",
                       "--keep-best", "loss")
    assert code == 2 and err.endswith(f"(--val FILE, or val.jsonl in the --data directory): "
                                      f"{str(data / 'val.jsonl')!r} holds none\n")
    (data / "train.jsonl").unlink()
    (data / "train.jsonl").mkdir()
    code, _, err = run(capsys, "train", "--data", data, "--epochs", 1, "--out", tmp_path / "r")
    assert code == 2 and err.endswith(f"--data {str(data)!r} holds train.jsonl as other than "
                                      "a regular file\n")
    assert not (tmp_path / "r").exists()


def test_data_is_a_file_or_a_directory_everywhere(capsys, tmp_path):
    """train --data DIR reads DIR/train.jsonl (+ val.jsonl), --data FILE trains
    on the file (validation only with --val); eval --data DIR reads
    DIR/val.jsonl. A directory without the file says which one it needs."""
    data = tmp_path / "data"
    assert main(["generate", "--out", str(data), "--n-train", "8", "--n-val", "4"]) == 0
    assert main(["train", "--data", str(data / "train.jsonl"), "--epochs", "1",
                 "--out", str(tmp_path / "f"), "--no-progress"]) == 0
    assert "validation" not in capsys.readouterr().out    # a file: no val.jsonl read
    assert main(["train", "--data", str(data / "train.jsonl"), "--val",
                 str(data / "val.jsonl"), "--epochs", "1", "--out", str(tmp_path / "v"),
                 "--no-progress"]) == 0
    assert "untrained" in capsys.readouterr().out
    ckpt = str(tmp_path / "v" / "checkpoint.npz")
    assert main(["eval", "--checkpoint", ckpt, "--data", str(data)]) == 0
    by_dir = capsys.readouterr().out
    assert main(["eval", "--checkpoint", ckpt, "--data", str(data / "val.jsonl")]) == 0
    assert capsys.readouterr().out == by_dir
    empty = tmp_path / "empty"
    empty.mkdir()
    for argv, name in ((["train", "--data", str(empty), "--epochs", "1", "--out",
                         str(tmp_path / "e")], "train.jsonl"),
                       (["eval", "--checkpoint", ckpt, "--data", str(empty)], "val.jsonl")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"is a directory without {name}" in err and err.count("\n") == 1
    assert main(["train", "--data", str(data), "--val", str(empty), "--epochs", "1",
                 "--out", str(tmp_path / "x")]) == 2
    assert "--val" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_resumed_run_shows_the_best_epochs_own_numbers(words, tmp_path, capsys):
    # the "best" column of a resumed run is the record of the epoch it names
    run_dir = tmp_path / "run"
    args = ["train", "--data", words, "--out", run_dir, "--no-progress",
            "--keep-best", "val_boundary_f1"]
    assert run(capsys, *args, "--epochs", 2, "--dim", 8)[0] == 0
    code, out, err = run(capsys, *args, "--epochs", 4, "--resume", run_dir / "checkpoint.npz")
    assert code == 0, err
    header = next(line for line in out.splitlines() if line.startswith("metric "))
    epoch = int(header.split("best (epoch ")[1].split(")")[0])
    row = next(line.split() for line in out.splitlines() if line.startswith("boundary_f1"))
    records = {r["epoch"]: r for r in read_log(run_dir / "metrics.jsonl")}
    want = (records[epoch]["val_boundary_f1"] if epoch in records
            else float(row[1]))     # the best is where this run started
    assert float(row[-1]) == pytest.approx(want, abs=1e-4)
    assert f"epoch {epoch}, val_boundary_f1 {float(row[-1]):.4f}" in out


def test_overwrite_replaces_the_whole_run_after_its_first_epoch(level1, tmp_path, capsys,
                                                                 monkeypatch):
    """--overwrite without --keep-best: the replaced run's best.npz goes with
    its log and checkpoint, after the new run's first epoch (before: it
    stayed, and `segment --model RUN/best.npz` used the old model quietly),
    and so does its metrics.png (`grapheme plot RUN`'s picture); stopped in
    its first epoch, the new run leaves the old one whole."""
    from grapheme.train import Trainer

    out = tmp_path / "run"
    assert run(capsys, "train", "--data", level1, "--epochs", 2, "--out", out,
               "--keep-best", "val_loss", "--no-progress")[0] == 0
    (out / "metrics.png").write_bytes(b"the replaced run's picture")
    old = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(old) == ["best.npz", "checkpoint.npz", "metrics.jsonl", "metrics.png"]

    original = Trainer._run_epoch

    def interrupted(self, *args):
        original(self, *args)
        raise KeyboardInterrupt
    monkeypatch.setattr(Trainer, "_run_epoch", interrupted)
    code, _, err = run(capsys, "train", "--data", level1, "--epochs", 1, "--out", out,
                       "--overwrite", "--no-progress")
    # no resume hint (not its checkpoint), but what was saved: nothing (a new
    # user's find: "interrupted" alone left them looking for a run to resume)
    assert code == 130 and err == ("grapheme: interrupted; no epoch of this run finished, so "
                                   "nothing of it is saved\n")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == old
    monkeypatch.setattr(Trainer, "_run_epoch", original)
    assert run(capsys, "train", "--data", level1, "--epochs", 1, "--out", out,
               "--overwrite", "--no-progress")[0] == 0
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.npz", "metrics.jsonl"]
    monkeypatch.setattr(Trainer, "_run_epoch", interrupted)   # and a resume's
    code, _, err = run(capsys, "train", "--data", level1, "--epochs", 2, "--out", out,
                       "--resume", out / "checkpoint.npz", "--no-progress")
    assert code == 130 and err == (f"grapheme: interrupted; no epoch of this run finished: "
                                   f"{out / 'checkpoint.npz'} still holds epoch 1\n")


@pytest.mark.parametrize("prog", ["grapheme", "python3 -m grapheme"])
def test_an_interrupted_run_says_how_to_continue(prog, level1, tmp_path, capsys, monkeypatch):
    """ "interrupted" alone (noted, and left, last session): the run's last
    checkpoint, and the option that continues it, are now named; as the
    command was started (a new user's find: under ``python -m grapheme``,
    an in-place build's, it said ``grapheme train``, which that shell lacks)."""
    from grapheme.train import Trainer

    out = tmp_path / "run"
    original = Trainer._run_epoch

    def second_interrupted(self, *args):
        if self.epoch == 1:
            raise KeyboardInterrupt
        return original(self, *args)
    monkeypatch.setattr(Trainer, "_run_epoch", second_interrupted)
    code = main(["train", "--data", str(level1), "--epochs", "3", "--out", str(out),
                 "--no-progress"], prog=prog)
    err = capsys.readouterr().err
    checkpoint = out / "checkpoint.npz"
    # the whole command (a new user's find: "--resume X" alone lacked --data,
    # --epochs and --out)
    assert code == 130 and err == (f"grapheme: interrupted; epoch 1 is saved; to continue "
                                   f"the run: {prog} train --data {level1} --epochs 3 "
                                   f"--out {out} --no-progress --resume {checkpoint}\n")
    monkeypatch.setattr(Trainer, "_run_epoch", original)
    assert run(capsys, "train", "--data", level1, "--epochs", 2, "--out", out, "--resume",
               checkpoint, "--no-progress")[0] == 0
    assert Trainer.from_checkpoint(checkpoint, progress=False).epoch == 2
    # and its usage lines too
    assert main(["train"], prog=prog) == 2
    assert capsys.readouterr().err.startswith(f"usage: {prog} train ")


def test_a_stop_just_after_a_save_names_the_epoch_on_disk(level1, tmp_path, capsys,
                                                          monkeypatch):
    """A test's find: a stop between a checkpoint's replace and the
    trainer's record of it named the epoch before the one on disk."""
    from grapheme.train import Trainer

    out = tmp_path / "run"
    original = Trainer._save

    def saved_then_stopped(self, path):
        original(self, path)
        if self.epoch == 2 and path.endswith("checkpoint.npz"):
            raise KeyboardInterrupt
    monkeypatch.setattr(Trainer, "_save", saved_then_stopped)
    code, _, err = run(capsys, "train", "--data", level1, "--epochs", 3, "--out", out,
                       "--no-progress")
    checkpoint = out / "checkpoint.npz"
    assert Trainer.from_checkpoint(checkpoint, progress=False).epoch == 2
    assert code == 130 and err.startswith("grapheme: interrupted; epoch 2 is saved; ")
    # and the log holds the epochs on disk (it was an epoch behind: an
    # attack helper's find), here and without a checkpoint
    assert [r["epoch"] for r in read_log(out / "metrics.jsonl")] == [1, 2]
    write_epoch = Trainer._write_epoch

    def stopped_before_the_log(self, *args, **kwargs):
        if self.epoch == 2:   # epoch 2 complete, its line not written
            raise KeyboardInterrupt
        write_epoch(self, *args, **kwargs)
    monkeypatch.setattr(Trainer, "_save", original)
    monkeypatch.setattr(Trainer, "_write_epoch", stopped_before_the_log)
    log = tmp_path / "log.jsonl"
    trainer = Trainer(gr.Embedding(4), gr.Morpher(), gr.StructuralLoss(), gr.Adam(),
                      log=log, progress=False)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit(load_pairs(level1 / "train.jsonl"), 3)
    assert [r["epoch"] for r in read_log(log)] == [1, 2]


@pytest.mark.skipif(sys.platform == "win32", reason="fcntl.flock: POSIX")
def test_a_second_run_into_the_same_out_is_refused(level1, tmp_path, capsys, monkeypatch):
    """Found by an attack helper: two `train --out RUN` at once both passed
    the existing-run check and interleaved their logs. The run's lock is
    held while it trains and removed when it ends, however it ends."""
    import subprocess
    import grapheme
    from grapheme.cli import RUN_LOCK, _run_lock
    from grapheme.train import Trainer

    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from grapheme.cli import _run_lock\n"
         f"with _run_lock({str(out)!r}):\n    print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, cwd=str(tmp_path), env={
            **os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(grapheme.__file__))})
    try:
        assert holder.stdout.readline() == "held\n"
        code, _, err = run(capsys, "train", "--data", level1, "--epochs", 1, "--out", out,
                           "--no-progress")
        assert code == 2 and f"is being written by another grapheme train (pid {holder.pid})" in err
        assert sorted(os.listdir(out)) == [RUN_LOCK]
    finally:
        holder.kill()   # kill -9: the kernel releases the lock
        holder.wait()
        holder.stdout.close()
    assert run(capsys, "train", "--data", level1, "--epochs", 1, "--out", out,
               "--no-progress")[0] == 0
    assert sorted(os.listdir(out)) == ["checkpoint.npz", "metrics.jsonl"]   # lock removed
    # removed on an error too, and an --out made for the run with it
    monkeypatch.setattr(Trainer, "_run_epoch", lambda *a: (_ for _ in ()).throw(MemoryError()))
    code, _, _ = run(capsys, "train", "--data", level1, "--epochs", 1, "--out",
                     tmp_path / "new" / "run", "--no-progress")
    assert code == 2 and not (tmp_path / "new").exists()
    with _run_lock(str(out)):   # and the lock can be taken again
        pass


@pytest.mark.skipif(not hasattr(__import__("signal"), "SIGHUP"), reason="POSIX signals")
def test_a_stopped_run_ends_as_an_interrupted_one(level1, tmp_path):
    """Left from stop 34: SIGTERM (``kill``, a scheduler's stop) ended the
    process where it stood: the lock file stayed, no resume command was
    said. The console script raises the stop signals as Ctrl-C."""
    import signal
    import subprocess
    import time
    import grapheme
    from grapheme.cli import RUN_LOCK

    out = tmp_path / "run"
    argv = ["train", "--data", str(level1), "--epochs", "100000", "--out", str(out),
            "--no-progress", "--dim", "4"]
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; from grapheme.cli import run; sys.exit(run())",
         *argv], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
        cwd=str(tmp_path), env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH":
                                os.path.dirname(os.path.dirname(grapheme.__file__))})
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoint.npz").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)   # some epochs later
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM
    saved = gr.Trainer.from_checkpoint(out / "checkpoint.npz", progress=False).epoch
    assert saved >= 1
    assert err == (f"grapheme: stopped by SIGTERM; epoch {saved} is saved; to continue the "
                   f"run: grapheme train --data {level1} --epochs 100000 --out {out} "
                   f"--no-progress --resume {out / 'checkpoint.npz'}\n")
    assert RUN_LOCK not in os.listdir(out)
    assert sorted(os.listdir(out)) == ["checkpoint.npz", "metrics.jsonl"]   # nothing half-written
    # an ignored signal stays ignored (nohup), and main() alone sets no handler
    code = ("import signal, sys; from grapheme import cli\n"
            "signal.signal(signal.SIGHUP, signal.SIG_IGN)\n"
            "cli.main(['--version'])\n"
            "assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL\n"
            "cli.main = lambda prog: 0 if signal.getsignal(signal.SIGTERM) is cli._raise_stopped "
            "else 1\n"
            "assert cli.run() == 0\n"
            "assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN\n"
            # once the command has ended, the default again: Stopped raised
            # inside the interpreter's shutdown (an attack helper's find)
            "assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL\n"
            # after the first stop signal the others are ignored: a second
            # one interrupted the run's ending (five SIGTERMs in a row: an
            # attack helper's find, a traceback at exit); Ctrl-C stays Python's
            "import os, time\n"
            "signal.signal(signal.SIGHUP, signal.SIG_DFL)\n"
            # Python's Ctrl-C, whatever the process was started with (a
            # shell's background job starts with SIGINT ignored: a CI run
            # started with & failed here)
            "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
            "def stopped_twice(prog):\n"
            "    try:\n"
            "        os.kill(os.getpid(), signal.SIGTERM); time.sleep(5)\n"
            "    except cli.Stopped:\n"
            "        os.kill(os.getpid(), signal.SIGTERM)\n"
            "        os.kill(os.getpid(), signal.SIGHUP); time.sleep(0.1)\n"
            "        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler\n"
            "        return 143\n"
            "cli.main = stopped_twice\n"
            "assert cli.run() == 143\n"
            "assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(tmp_path), env={
        **os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(grapheme.__file__))},
        stdout=subprocess.DEVNULL)


def test_a_file_system_without_locks_trains_unlocked(tmp_path, monkeypatch, capsys):
    """Review: every OSError of flock read as "held by another run", so on
    a file system without locks (ENOLCK) every run was refused."""
    import errno
    import fcntl

    from grapheme.cli import RUN_LOCK, _run_lock

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
    monkeypatch.setattr(fcntl, "flock", no_locks)
    with _run_lock(str(tmp_path)):
        assert RUN_LOCK not in os.listdir(tmp_path)
    assert "cannot be locked" in capsys.readouterr().err


def test_the_lock_file_is_never_written_through_a_link(level1, tmp_path, capsys):
    """An attack helper's find: a symbolic link in --out named like the
    lock made train truncate the file it named to the run's pid."""
    from grapheme.cli import RUN_LOCK

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    for make in (os.symlink, os.link):
        out = tmp_path / make.__name__
        out.mkdir()
        make(victim, out / RUN_LOCK)
        code, _, err = run(capsys, "train", "--data", level1, "--epochs", 1, "--out", out,
                           "--no-progress")
        assert code == 2 and f"holds {RUN_LOCK} as a " in err and "remove it" in err
        assert victim.read_text() == "precious"
        assert sorted(os.listdir(out)) == [RUN_LOCK]


def test_overwrite_with_another_runs_checkpoint_replaces_the_best(level1, tmp_path, capsys):
    """Review: --overwrite --resume OTHER/checkpoint.npz kept the replaced
    run's best.npz, which segment then used quietly."""
    from grapheme.train import Trainer

    a, b = tmp_path / "a", tmp_path / "b"
    assert run(capsys, "train", "--data", level1, "--epochs", 1, "--out", a,
               "--keep-best", "val_loss", "--no-progress")[0] == 0
    assert run(capsys, "train", "--data", level1, "--epochs", 1, "--out", b, "--seed", 5,
               "--no-progress")[0] == 0
    assert run(capsys, "train", "--data", level1, "--epochs", 2, "--out", a, "--resume",
               b / "checkpoint.npz", "--overwrite", "--no-progress")[0] == 0
    assert sorted(p.name for p in a.iterdir()) == ["checkpoint.npz", "metrics.jsonl"]
    # resuming its own run keeps its best
    assert run(capsys, "train", "--data", level1, "--epochs", 1, "--out", b, "--keep-best",
               "val_loss", "--overwrite", "--no-progress")[0] == 0
    # (and, since stop 34, keeps it on: see test_a_resumed_run_keeps_its_best_on)
    code, text, _ = run(capsys, "train", "--data", level1, "--epochs", 2, "--out", b,
                        "--resume", b / "checkpoint.npz", "--overwrite", "--no-progress")
    assert code == 0 and "--keep-best val_loss: kept on from the checkpoint" in text
    # review (left last session): resuming its best.npz into its own --out,
    # --overwrite removed that file after the first epoch
    assert run(capsys, "train", "--data", level1, "--epochs", 3, "--out", b, "--resume",
               b / "best.npz", "--overwrite", "--no-progress")[0] == 0
    assert Trainer.from_checkpoint(b / "best.npz", progress=False).best["metric"] == "val_loss"


def test_a_resumed_run_keeps_its_best_on(level1, tmp_path, capsys):
    """A new user's find: resumed without --keep-best, a run's best.npz
    stayed at the epoch the first command stopped at, unsaid, though the
    run went on to better epochs."""
    from grapheme.train import Trainer

    out = tmp_path / "run"
    assert run(capsys, "train", "--data", level1, "--epochs", 1, "--out", out, "--keep-best",
               "val_loss", "--no-progress")[0] == 0
    code, text, _ = run(capsys, "train", "--data", level1, "--epochs", 4, "--out", out,
                        "--resume", out / "checkpoint.npz", "--no-progress")
    assert code == 0 and "--keep-best val_loss: kept on from the checkpoint" in text
    assert f"best: {out / 'best.npz'}" in text
    log = read_log(out / "metrics.jsonl")
    best = Trainer.from_checkpoint(out / "best.npz", progress=False)
    losses = [r["val_loss"] for r in log]
    if min(losses) < best.baseline["val_loss"]:   # else the untrained model stays best
        assert best.epoch == 1 + losses.index(min(losses)) and best.epoch > 0
    # without validation pairs it cannot be kept on: said, not silent
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "train.jsonl").write_bytes((level1 / "train.jsonl").read_bytes())
    code, text, _ = run(capsys, "train", "--data", alone, "--epochs", 5, "--out", out,
                        "--resume", out / "checkpoint.npz", "--no-progress")
    assert code == 0 and (f"note: {out / 'best.npz'} stays at epoch {best.epoch}, not kept "
                          f"on: no validation pairs") in text
    # --new-data on the very same data keeps it on (an attack helper's find:
    # it said "new data" and dropped the record)
    code, text, err = run(capsys, "train", "--data", level1, "--new-data", "--epochs", 6,
                          "--out", out, "--resume", out / "checkpoint.npz", "--no-progress")
    assert code == 0, err
    assert "--keep-best val_loss: kept on from the checkpoint" in text
    # nor on new data (a review's find: a segmentation metric was then
    # checked against text pairs, and the resume refused a flag never given)
    other = tmp_path / "other"
    other.mkdir()
    lines = (level1 / "train.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    (other / "train.jsonl").write_text("".join(lines[:-1]), encoding="utf-8")
    (other / "val.jsonl").write_bytes((level1 / "val.jsonl").read_bytes())
    held = Trainer.from_checkpoint(out / "best.npz", progress=False).epoch
    code, text, err = run(capsys, "train", "--data", other, "--new-data", "--epochs", 7,
                          "--out", out, "--resume", out / "checkpoint.npz", "--no-progress")
    assert code == 0, err
    assert f"stays at epoch {held}, not kept on: new data" in text


def test_a_resume_by_another_metric_keeps_the_best_file(level1, tmp_path, capsys):
    """A new user's find: resumed with --keep-best val_loss, a run that kept
    its best by val_accuracy replaced best.npz with a worse model, unsaid."""
    out = tmp_path / "run"
    assert run(capsys, "train", "--data", level1, "--epochs", 1, "--out", out, "--keep-best",
               "val_accuracy", "--no-progress")[0] == 0
    kept = (out / "best.npz").read_bytes()
    resume = ["train", "--data", level1, "--epochs", 2, "--out", out, "--resume",
              out / "checkpoint.npz", "--keep-best", "val_loss", "--no-progress"]
    code, text, err = run(capsys, *resume)
    epoch = gr.Trainer.from_checkpoint(out / "best.npz", progress=False).epoch
    assert code == 2 and text == "" and err == (
        f"grapheme train: error: --keep-best val_loss: {str(out / 'best.npz')!r} holds the "
        f"best val_accuracy (epoch {epoch}), which a record of val_loss would replace; keep "
        "on with --keep-best val_accuracy (or without --keep-best), move it away first, or "
        "add --overwrite\n")
    assert (out / "best.npz").read_bytes() == kept
    assert len(read_log(out / "metrics.jsonl")) == 1
    # a mistyped metric is named as such first, and with nothing to train
    # nothing is replaced (a review's finds)
    code, _, err = run(capsys, *resume[:-2], "val_acuracy", "--no-progress")
    assert code == 2 and "--keep-best: keep_best must be one of" in err
    code, text, err = run(capsys, *resume[:4], 1, *resume[5:])
    assert code == 0 and "nothing to do" in text, err
    # the same metric keeps on; --overwrite starts the other record
    code, _, err = run(capsys, *resume[:-2], "val_accuracy", "--no-progress")
    assert code == 0, err
    code, _, err = run(capsys, *resume[:4], 3, *resume[5:], "--overwrite")
    assert code == 0, err
    assert gr.Trainer.from_checkpoint(out / "best.npz", progress=False).best["metric"] == \
        "val_loss"


def test_a_resume_on_other_data_is_refused_first_in_the_commands_words(words, level1,
                                                                      tmp_path, capsys):
    """A new user's find: a note on --keep-best came first, then a refusal
    that told a command-line user to "pass new_data=True"."""
    out = tmp_path / "run"
    assert run(capsys, "train", "--data", words, "--epochs", 1, "--out", out, "--keep-best",
               "val_boundary_f1", "--no-progress")[0] == 0
    code, text, err = run(capsys, "train", "--data", level1, "--epochs", 2, "--out", out,
                          "--resume", out / "checkpoint.npz", "--no-progress")
    assert code == 2 and text == ""
    assert err.startswith(f"grapheme train: error: --data is not the data "
                          f"{str(out / 'checkpoint.npz')!r} was trained on (")
    assert err.endswith("add --new-data to continue on this\n") and "new_data=" not in err


def test_keep_best_on_new_data_starts_its_record_there(level1, tmp_path, capsys):
    """An attack helper's find: resumed on other data, the record kept the
    value measured on the old validation pairs (0.57 against the new ones'
    1.07), so best.npz never moved and named an epoch of the old data."""
    from grapheme.train import Trainer

    easy = tmp_path / "easy"   # dedup: a low val_loss, which arithmetic never reaches
    assert run(capsys, "generate", "--out", easy, "--n-train", 64, "--n-val", 16,
               "--seed", 2, "--tasks", "dedup")[0] == 0
    out = tmp_path / "run"
    assert run(capsys, "train", "--data", easy, "--epochs", 1, "--out", out, "--keep-best",
               "val_loss", "--no-progress")[0] == 0
    old = Trainer.from_checkpoint(out / "best.npz", progress=False).best["value"]
    # the record on the new data would replace best.npz: refused unless
    # --overwrite (an attack helper's find: a worse model replaced it)
    kept = (out / "best.npz").read_bytes()
    argv = ["train", "--data", level1, "--new-data", "--epochs", 3, "--out", out,
            "--resume", out / "checkpoint.npz", "--keep-best", "val_loss", "--no-progress"]
    code, text, err = run(capsys, *argv)
    assert (code, text) == (2, "") and (out / "best.npz").read_bytes() == kept
    assert err == (f"grapheme train: error: --keep-best val_loss: {str(out / 'best.npz')!r} "
                   "holds the best val_loss (epoch 0) of the data the checkpoint was trained "
                   "on, which a record on the new data would replace; move it away first, "
                   "or add --overwrite\n")
    assert run(capsys, *argv, "--overwrite")[0] == 0
    later = [r["val_loss"] for r in read_log(out / "metrics.jsonl")[1:]]
    best = Trainer.from_checkpoint(out / "best.npz", progress=False).best
    assert old < min(later)                          # the old record would never move
    assert old < best["value"] <= min(later)         # measured on the new pairs


def test_a_resume_does_not_write_its_best_over_another_file(level1, tmp_path, capsys):
    """An attack helper's find: a resume wrote its best over whatever lay in
    best.npz (another run's best, a user's file), said as "does not hold
    its best"; refused, named, unless --overwrite."""
    out = tmp_path / "run"
    assert run(capsys, "train", "--data", level1, "--epochs", 1, "--out", out, "--keep-best",
               "val_loss", "--no-progress")[0] == 0
    (out / "best.npz").write_text("a user's notes")
    for named in ((), ("--keep-best", "val_loss")):
        code, text, err = run(capsys, "train", "--data", level1, "--epochs", 2, "--out", out,
                              "--resume", out / "checkpoint.npz", "--no-progress", *named)
        assert (code, text) == (2, "")
        assert err == (f"grapheme train: error: --keep-best val_loss: "
                       f"{str(out / 'best.npz')!r} is not this run's (another run's best, or "
                       "not a checkpoint), which a record here would replace; move it away "
                       "first, or add --overwrite\n")
        assert (out / "best.npz").read_text() == "a user's notes"
    assert run(capsys, "train", "--data", level1, "--epochs", 2, "--out", out, "--resume",
               out / "checkpoint.npz", "--no-progress", "--overwrite")[0] == 0
    assert (out / "best.npz").read_bytes()[:2] == b"PK"   # a checkpoint now
    # a run that kept no best, given --keep-best on resume (a final read's
    # find: a traceback, as the check read the record it has not)
    plain = tmp_path / "plain"
    assert run(capsys, "train", "--data", level1, "--epochs", 1, "--out", plain,
               "--no-progress")[0] == 0
    (plain / "best.npz").write_bytes((out / "best.npz").read_bytes())   # another run's
    code, text, err = run(capsys, "train", "--data", level1, "--epochs", 2, "--out", plain,
                          "--resume", plain / "checkpoint.npz", "--no-progress",
                          "--keep-best", "val_loss")
    assert (code, text) == (2, "") and "is not this run's" in err and "Traceback" not in err


def test_keep_best_on_other_validation_pairs_starts_its_record_there(level1, tmp_path,
                                                                    capsys):
    """Left from stop 34: resumed with another --val, the record kept the
    value measured on the first validation pairs, so best.npz compared two
    validation sets. The record names its pairs (a sha256) and, told to
    (--keep-best, --overwrite), starts anew on others."""
    from grapheme.train import Trainer

    easy = tmp_path / "easy"   # dedup: a low val_loss, which arithmetic never reaches
    assert run(capsys, "generate", "--out", easy, "--n-train", 64, "--n-val", 16,
               "--seed", 2, "--tasks", "dedup")[0] == 0
    out = tmp_path / "run"
    assert run(capsys, "train", "--data", level1, "--val", easy / "val.jsonl", "--epochs", 1,
               "--out", out, "--keep-best", "val_loss", "--no-progress")[0] == 0
    first = Trainer.from_checkpoint(out / "best.npz", progress=False).best
    assert len(first["val"]) == 64   # a sha256
    # an attack helper's find: the new record replaced best.npz unasked;
    # not kept on by itself (a diff reviewer's find: refused, with no way
    # out), refused where --keep-best names it, taken with --overwrite
    kept = (out / "best.npz").read_bytes()
    code, text, err = run(capsys, "train", "--data", level1, "--epochs", 2, "--out", out,
                          "--resume", out / "checkpoint.npz", "--no-progress")
    assert code == 0, err
    assert (f"note: {out / 'best.npz'} stays at epoch 0, not kept on: other validation pairs "
            "than its best's (--keep-best val_loss --overwrite starts a record on them)") in text
    assert (out / "best.npz").read_bytes() == kept
    # a moved run's note names where its best lies now, not the record's old path
    import shutil
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    code, text, err = run(capsys, "train", "--data", level1, "--epochs", 3, "--out", moved,
                          "--resume", moved / "checkpoint.npz", "--no-progress")
    assert code == 0 and f"note: {moved / 'best.npz'} stays at epoch 0" in text, err
    code, text, err = run(capsys, "train", "--data", level1, "--epochs", 3, "--out", out,
                          "--resume", out / "checkpoint.npz", "--no-progress",
                          "--keep-best", "val_loss")
    assert (code, text) == (2, "")
    assert err == (f"grapheme train: error: --keep-best val_loss: {str(out / 'best.npz')!r} "
                   "holds the best val_loss (epoch 0) measured on other validation pairs, "
                   "which a record on these would replace; validate on the pairs it was "
                   "measured on, move it away first, or add --overwrite\n")
    assert (out / "best.npz").read_bytes() == kept
    code, text, err = run(capsys, "train", "--data", level1, "--epochs", 3, "--out", out,
                          "--resume", out / "checkpoint.npz", "--no-progress",
                          "--keep-best", "val_loss", "--overwrite")
    assert code == 0, err
    later = [r["val_loss"] for r in read_log(out / "metrics.jsonl")[2:]]
    best = Trainer.from_checkpoint(out / "best.npz", progress=False).best
    assert first["value"] < min(later)               # the old record would never move
    assert first["value"] < best["value"] <= min(later)   # measured on level1's val
    assert best["val"] != first["val"]
    # on the same pairs the record goes on, unsaid
    code, text, _ = run(capsys, "train", "--data", level1, "--epochs", 4, "--out", out,
                        "--resume", out / "checkpoint.npz", "--no-progress")
    assert code == 0 and "started anew" not in text
    assert Trainer.from_checkpoint(out / "checkpoint.npz", progress=False).best["val"] == \
        best["val"]


def test_a_resume_whose_validation_lacks_the_kept_metric_says_so(words, level1, tmp_path,
                                                                capsys):
    out = tmp_path / "run"
    assert run(capsys, "train", "--data", words, "--epochs", 1, "--out", out, "--keep-best",
               "val_boundary_f1", "--no-progress")[0] == 0
    code, text, err = run(capsys, "train", "--data", words, "--val", level1 / "val.jsonl",
                          "--epochs", 2, "--out", out, "--resume", out / "checkpoint.npz",
                          "--no-progress")
    assert code == 0, err
    assert (f"note: {out / 'best.npz'} stays at epoch 1, not kept on: the validation pairs "
            f"have no val_boundary_f1") in text


def test_keep_best_continued_into_another_out_writes_its_best(level1, tmp_path, capsys):
    """Second review: a run resumed from another run's checkpoint kept that
    run's best record, so its own --out got no best.npz (or kept a replaced
    run's) while the summary named it."""
    from grapheme.train import Trainer

    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert run(capsys, "train", "--data", level1, "--epochs", 2, "--out", a, "--keep-best",
               "val_loss", "--no-progress")[0] == 0
    assert run(capsys, "train", "--data", level1, "--epochs", 1, "--out", c, "--dim", 16,
               "--keep-best", "val_loss", "--no-progress")[0] == 0
    for out, extra in ((b, []), (c, ["--overwrite"])):
        code, text, _ = run(capsys, "train", "--data", level1, "--epochs", 3, "--out", out,
                            "--resume", a / "checkpoint.npz", "--keep-best", "val_loss",
                            "--no-progress", *extra)
        assert code == 0 and f"best: {out / 'best.npz'}" in text
        best = Trainer.from_checkpoint(out / "best.npz", progress=False)
        assert best.embedding.dim == 64 and best.epoch >= 2   # a's lineage, not c's
        assert best.best["path"] == str(out / "best.npz")
    # kept on without --keep-best, into a folder whose best.npz does not
    # hold the record: said to start anew ("kept on" alone, before: an
    # attack helper's find)
    d = tmp_path / "d"
    code, text, _ = run(capsys, "train", "--data", level1, "--epochs", 3, "--out", d,
                        "--resume", a / "checkpoint.npz", "--no-progress")
    epoch = Trainer.from_checkpoint(a / "checkpoint.npz", progress=False).best["epoch"]
    assert code == 0 and ("--keep-best val_loss: kept on from the checkpoint, its record "
                          f"started anew at epoch 2 ({d / 'best.npz'} does not hold its "
                          f"best, epoch {epoch})") in text
    assert Trainer.from_checkpoint(d / "best.npz", progress=False).epoch >= 2


def test_an_existing_out_is_locked_before_it_is_looked_at(level1, tmp_path, capsys,
                                                           monkeypatch):
    """Second review: the lock came after the run directory's check and the
    checkpoint's load, so a second resume of one run could pass both, wait,
    and rewind the run the first had moved on."""
    import fcntl

    import grapheme.cli as cli

    out = tmp_path / "run"
    assert run(capsys, "train", "--data", level1, "--epochs", 1, "--out", out,
               "--no-progress")[0] == 0
    seen = []
    check = cli._check_run_directory

    def spy(*args):
        with open(out / cli.RUN_LOCK, "rb") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                seen.append("free")
            except BlockingIOError:
                seen.append("held")
        return check(*args)
    monkeypatch.setattr(cli, "_check_run_directory", spy)
    assert run(capsys, "train", "--data", level1, "--epochs", 2, "--out", out, "--resume",
               out / "checkpoint.npz", "--no-progress")[0] == 0
    assert seen == ["held"] and cli.RUN_LOCK not in os.listdir(out)


@pytest.mark.skipif(sys.platform == "win32", reason="symbolic links")
def test_out_as_a_dangling_symbolic_link_is_named(level1, tmp_path, capsys):
    """Left last session: a dangling symbolic link as --out failed with
    "File exists" when the run made its directory."""
    link = tmp_path / "run"
    link.symlink_to(tmp_path / "gone")
    code, _, err = run(capsys, "train", "--data", level1, "--epochs", 1, "--out", link,
                       "--no-progress")
    assert code == 2 and err == (f"grapheme train: error: --out {str(link)!r} is a symbolic "
                                 f"link to {str(tmp_path / 'gone')!r}, which does not exist\n")
    assert not (tmp_path / "gone").exists()


@pytest.mark.parametrize("others, tty, said", [
    (3, True, "OMP_NUM_THREADS=1 may be faster"), (0, True, None), (3, False, None),
    (None, True, None)], ids=["busy", "idle", "not-a-terminal", "no-proc"])
def test_train_notes_cores_other_programs_hold(level1, tmp_path, capsys, monkeypatch,
                                              others, tty, said):
    """A new user's trial: on a machine busy with other work an epoch took
    15.1 s against 1.5 s with OMP_NUM_THREADS=1, and nothing said why. A
    person at a terminal is told, once, before training; a log or a pipe is
    not."""
    from grapheme import _core, cli

    monkeypatch.setattr(_core, "openmp_threads", lambda: 2)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(cli, "_others_running", lambda: others)
    monkeypatch.setattr(cli, "_isatty", lambda stream: tty)
    code, out, err = run(capsys, "train", "--data", level1, "--epochs", 1, "--out",
                         tmp_path / "run", "--no-progress")
    assert code == 0, err
    notes = [line for line in err.splitlines() if "note:" in line]
    if said is None:
        assert notes == []
    else:
        assert notes == [
            "grapheme train: note: 3 other threads want the 2 cores grapheme's 2 threads "
            "run on; they wait for each other, and one without a core can make training "
            "many times slower: OMP_NUM_THREADS=1 may be faster (README, \"Threads\")"]


def test_others_running_reads_proc_loadavg(tmp_path, monkeypatch):
    from grapheme import cli

    loadavg = tmp_path / "loadavg"
    monkeypatch.setattr(cli, "LOADAVG", str(loadavg))
    loadavg.write_text("0.50 0.40 0.30 3/120 999\n")
    assert cli._others_running(reads=3, pause=0) == 2   # less this thread
    loadavg.write_text("0.50 0.40 0.30 1/120 999\n")
    assert cli._others_running(reads=3, pause=0) == 0
    loadavg.write_text("garbled\n")
    assert cli._others_running(reads=3, pause=0) is None
    loadavg.unlink()
    assert cli._others_running(reads=3, pause=0) is None


def test_an_out_made_by_another_run_meanwhile_is_refused(level1, tmp_path, capsys,
                                                       monkeypatch):
    """An attack helper's find: --out was looked at before it existed, and a
    run that made it in between (before this one locked it) was replaced."""
    from grapheme import cli

    other, out = tmp_path / "other", tmp_path / "run"
    assert run(capsys, "train", "--data", level1, "--epochs", 1, "--out", other,
               "--no-progress")[0] == 0
    real = cli._check_same_data

    def meanwhile(args, trainer, pairs):   # after the first look, before the lock
        import shutil
        shutil.copytree(other, out)
        return real(args, trainer, pairs)

    monkeypatch.setattr(cli, "_check_same_data", meanwhile)
    code, _, err = run(capsys, "train", "--data", level1, "--epochs", 2, "--out", out,
                       "--seed", 5, "--no-progress")
    assert code == 2 and f"--out {str(out)!r} already holds a run" in err
    assert (out / "checkpoint.npz").read_bytes() == (other / "checkpoint.npz").read_bytes()
    assert (out / "metrics.jsonl").read_bytes() == (other / "metrics.jsonl").read_bytes()
