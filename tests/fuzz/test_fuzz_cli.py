"""The ``grapheme`` command under malformed and extreme arguments and files.

Every run must end with status 0, or 2 with one line on stderr (argparse's
usage errors: its usage text and one ``error:`` line), and a run that fails
must leave every file it was pointed at exactly as it was.
"""
import contextlib
import hashlib
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from grapheme import cli
from grapheme.checkpoint import save_checkpoint
from fuzzing import fuzz


def snapshot(root):
    """Every path under ``root`` with its type and content hash."""
    out = {}
    for base, dirs, files in os.walk(root):
        for d in dirs:
            out[os.path.relpath(os.path.join(base, d), root)] = "dir"
        for f in files:
            path = os.path.join(base, f)
            try:
                with open(path, "rb") as fh:
                    out[os.path.relpath(path, root)] = hashlib.sha256(fh.read()).hexdigest()
            except OSError:
                out[os.path.relpath(path, root)] = "unreadable"
    return out


@pytest.fixture
def world(tmp_path_factory):
    """Data directories and files, good and bad, and checkpoint-like files
    (fresh for every test: a command that succeeds may change them)."""
    root = tmp_path_factory.mktemp("world")
    pairs = [{"input": "abc", "target": "ab"}, {"input": "xyy", "target": "xy"}]
    good = root / "good"
    good.mkdir()
    (good / "train.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    (good / "val.jsonl").write_text(json.dumps(pairs[0]) + "\n")
    bad_lines = {
        "bom": b"\xef\xbb\xbf" + json.dumps(pairs[0]).encode() + b"\n",
        "nested": b"[" * 50000 + b"]" * 50000 + b"\n",
        "digits": b'{"input": "a", "target": "b", "n": ' + b"9" * 5000 + b"}\n",
        "utf8": b'{"input": "\xff", "target": "b"}\n',
        "list": b"[1, 2]\n",
        "surrogate": b'{"input": "\\ud800", "target": "b"}\n',
        "empty": b"",
    }
    for name, body in bad_lines.items():
        d = root / name
        d.mkdir()
        (d / "train.jsonl").write_bytes(body)
    ck = root / "ck"
    ck.mkdir()
    save_checkpoint(ck / "meta_only.npz", {"x": np.zeros(2)}, {"epoch": -1})
    data = (ck / "meta_only.npz").read_bytes()
    (ck / "truncated.npz").write_bytes(data[: len(data) // 2])
    (ck / "text.npz").write_text("not a checkpoint")
    (ck / "adir.npz").mkdir()
    run = root / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"epoch": 1, "loss": 0.5}\n')
    return root


VALUES = ["0", "1", "2", "-1", "1e309", "nan", "inf", "-inf", "9" * 5000, "", "abc",
          "100000000000", "0.5", "1e-320", "3.5"]


def argv_strategy(root):
    paths = st.sampled_from([str(root / p) for p in (
        "good", "bom", "nested", "digits", "utf8", "list", "surrogate", "empty",
        "missing", "good/train.jsonl", "ck/meta_only.npz", "ck/truncated.npz",
        "ck/text.npz", "ck/adir.npz", "run", "run/metrics.jsonl", "newdir/sub")])
    value = st.one_of(st.sampled_from(VALUES), paths)
    options = {
        "generate": ["--out", "--n-train", "--n-val", "--seed", "--tasks"],
        "train": ["--data", "--epochs", "--out", "--batch-size", "--lr", "--seed", "--dim",
                  "--estimator", "--baseline", "--samples", "--target-rate", "--resume",
                  "--overwrite", "--no-progress"],
        "eval": ["--checkpoint", "--data", "--batch-size"],
    }

    @st.composite
    def build(draw):
        command = draw(st.sampled_from(sorted(options)))
        argv = [command]
        for opt in draw(st.lists(st.sampled_from(options[command]), max_size=7)):
            argv.append(opt)
            if opt not in ("--overwrite", "--no-progress"):
                argv.append(draw(value))
        if command == "train" and "--epochs" in argv:
            i = argv.index("--epochs") + 1
            if i < len(argv) and argv[i].isdigit() and len(argv[i]) < 6:
                argv[i] = str(min(int(argv[i]), 2))   # keep real training short
        if command == "generate" and "--n-train" not in argv:
            argv += ["--n-train", "3"]
        return argv

    return build()


def run_main(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(argv)
    return code, out.getvalue(), err.getvalue()


def check_run(root, argv):
    before = snapshot(root)
    code, out, err = run_main(argv)
    assert code in (0, 2), (argv, code, err)
    if code == 2:
        lines = err.strip().splitlines()
        if lines and lines[0].startswith("usage:"):
            assert lines[-1].startswith("grapheme") and "error:" in lines[-1], err
        else:
            assert len(lines) == 1 and lines[0].startswith(f"grapheme {argv[0]}: error: "), err
            assert "Traceback" not in err
        assert snapshot(root) == before, f"{argv} failed but changed files"
    return code, err


def test_cli_fuzz(world, monkeypatch):
    # relative paths (an --out of "0" or "abc") land in the world, not the checkout
    monkeypatch.chdir(world)

    @fuzz
    @given(argv=argv_strategy(world))
    def inner(argv):
        check_run(world, argv)

    inner()


@pytest.mark.parametrize("name, message", [
    ("nested", "train.jsonl:1: invalid JSON (nested too deeply)"),
    ("digits", "train.jsonl:1: invalid JSON (an integer with more than 4300 digits)"),
    ("utf8", "train.jsonl:1: invalid UTF-8"),
    ("surrogate", "train.jsonl:1: 'input' contains a lone surrogate"),
])
def test_bad_data_files_are_one_line_errors(world, name, message, tmp_path):
    code, err = check_run(world, ["train", "--data", str(world / name), "--epochs", "1",
                                  "--out", str(tmp_path / "out")])
    assert code == 2 and message in err
    assert not (tmp_path / "out").exists()


def test_existing_run_is_refused_and_untouched(world):
    code, err = check_run(world, ["train", "--data", str(world / "good"), "--epochs", "1",
                                  "--out", str(world / "run")])
    assert code == 2
    # a log and no checkpoint: nothing to --resume
    assert err.strip().endswith(
        f"--out {str(world / 'run')!r} already holds a run (metrics.jsonl); pass "
        "--overwrite to replace it, or another --out")


def test_invalid_arguments_create_no_directory(world, tmp_path):
    out = tmp_path / "never"
    for extra in (["--samples", "3"], ["--estimator", "reinforce", "--baseline", "loo"],
                  ["--resume", str(world / "ck" / "truncated.npz")]):
        code, _ = check_run(world, ["train", "--data", str(world / "good"), "--epochs", "1",
                                    "--out", str(out)] + extra)
        assert code == 2 and not out.exists()


def test_huge_dim_is_one_line(world, tmp_path):
    code, err = check_run(world, ["train", "--data", str(world / "good"), "--epochs", "1",
                                  "--out", str(tmp_path / "o"), "--dim", "100000000000"])
    assert code == 2 and "dim must be <= 2147483647" in err


@pytest.mark.parametrize("argv", [
    ["eval", "--checkpoint", "{ck}/adir.npz", "--data", "{good}/train.jsonl"],
    ["eval", "--checkpoint", "{ck}/text.npz", "--data", "{good}/train.jsonl"],
    ["train", "--data", "{nested}", "--epochs", "1", "--out", "{tmp}/o"],
    ["generate", "--out", "{tmp}/g", "--n-train", "100000000000000"],
])
def test_cli_in_a_child_process(world, tmp_path, argv):
    """The console entry point itself: no crash, status 2, one line."""
    argv = [a.format(ck=world / "ck", good=world / "good", nested=world / "nested",
                     tmp=tmp_path) for a in argv]
    import grapheme

    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(grapheme.__file__)))
    # cwd away from the checkout: `-m` puts the cwd first on sys.path, and the
    # checkout's unbuilt source would shadow the installed package
    proc = subprocess.run([sys.executable, "-m", "grapheme.cli"] + argv, capture_output=True,
                          text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "pickle" not in proc.stderr
