"""Tests for grapheme.checkpoint: round trip, atomicity, corruption."""
import os
import re

import numpy as np
import pytest

from grapheme.checkpoint import _atomic_open, load_checkpoint, save_checkpoint


@pytest.fixture
def ckpt(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"embedding.weight": rng.normal(size=(40, 16)),
              "embedding.codes": np.arange(40, dtype=np.int32),
              "theta": np.array(0.8), "optim.step.theta": np.array(3)}
    meta = {"epoch": 2, "rng": {"state": 2 ** 127 + 12345, "inc": 7},
            "lr": 0.1 + 0.2, "name": "żółw", "history": [{"loss": 1.5}]}
    path = tmp_path / "ckpt.npz"
    save_checkpoint(path, arrays, meta)
    return path, arrays, meta


def test_round_trip_is_exact(ckpt):
    path, arrays, meta = ckpt
    loaded, meta2 = load_checkpoint(path, required=["theta"])
    assert meta2 == meta
    assert set(loaded) == set(arrays)
    for k in arrays:
        assert loaded[k].dtype == arrays[k].dtype
        np.testing.assert_array_equal(loaded[k], arrays[k])


def test_no_pickle_inside(ckpt):
    path, _, _ = ckpt
    with np.load(path, allow_pickle=False) as f:
        assert "__meta__" in f.files
        assert f["__meta__"].dtype == np.uint8


def test_overwrite_is_atomic_and_leaves_no_temp(ckpt):
    path, arrays, meta = ckpt
    with pytest.raises(TypeError, match="object dtype"):
        save_checkpoint(path, {"bad": np.array([{}], dtype=object)}, meta)
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        save_checkpoint(path, arrays, {"x": object()})
    save_checkpoint(path, {"theta": np.array(1.0)}, {"epoch": 3})
    loaded, meta2 = load_checkpoint(path)
    assert meta2 == {"epoch": 3} and list(loaded) == ["theta"]
    assert os.listdir(path.parent) == ["ckpt.npz"]


def test_argument_validation(tmp_path):
    with pytest.raises(TypeError, match="arrays must be a dict"):
        save_checkpoint(tmp_path / "c.npz", [1], {})
    with pytest.raises(TypeError, match="meta must be a dict"):
        save_checkpoint(tmp_path / "c.npz", {}, "x")
    with pytest.raises(ValueError, match="reserved"):
        save_checkpoint(tmp_path / "c.npz", {"__meta__": np.zeros(1)}, {})
    with pytest.raises(FileNotFoundError):
        save_checkpoint(tmp_path / "missing" / "c.npz", {}, {})
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "none.npz")


def _expect_corrupted(path):
    with pytest.raises(ValueError) as info:
        load_checkpoint(path, required=["embedding.weight", "theta"])
    msg = str(info.value)
    assert msg.startswith(f"checkpoint {str(path)!r} is corrupted or truncated: ")
    # Raised from None: no numpy/zipfile traceback chained to it.
    exc = info.value
    assert exc.__cause__ is None
    assert exc.__context__ is None or exc.__suppress_context__


def test_truncated_at_every_tenth_length(ckpt, tmp_path):
    path, _, _ = ckpt
    data = path.read_bytes()
    bad = tmp_path / "trunc.npz"
    lengths = sorted(set(np.linspace(0, len(data) - 1, 60).astype(int).tolist())
                     | {0, 1, 4, 30, len(data) - 22, len(data) - 1})
    for n in lengths:
        bad.write_bytes(data[:n])
        _expect_corrupted(bad)


def test_flipped_bytes(ckpt, tmp_path):
    path, _, _ = ckpt
    data = bytearray(path.read_bytes())
    bad = tmp_path / "flip.npz"
    rng = np.random.default_rng(1)
    positions = rng.choice(len(data), size=150, replace=False)
    for pos in positions.tolist():
        flipped = bytearray(data)
        flipped[pos] ^= 0xFF
        bad.write_bytes(bytes(flipped))
        try:
            arrays, meta = load_checkpoint(bad, required=["embedding.weight", "theta"])
        except ValueError as exc:
            assert "is corrupted or truncated" in str(exc)
        else:
            # A flip in slack bytes the zip reader ignores (e.g. a timestamp)
            # must leave the content intact; CRCs guard the data itself.
            np.testing.assert_array_equal(arrays["theta"], 0.8)
            assert meta["epoch"] == 2


def test_missing_keys(tmp_path):
    path = tmp_path / "m.npz"
    save_checkpoint(path, {"theta": np.array(0.5)}, {})
    with pytest.raises(ValueError, match=r"corrupted or truncated: missing array\(s\) "
                                         r"\['embedding.weight'\]"):
        load_checkpoint(path, required=["theta", "embedding.weight"])
    # An npz written by someone else, without the meta entry.
    np.savez(tmp_path / "plain.npz", theta=np.array(0.5))
    _expect_corrupted(tmp_path / "plain.npz")


def test_not_npz(tmp_path):
    # not a zip at all: said so, and never numpy's advice to use allow_pickle
    np.save(tmp_path / "a.npy", np.zeros(3))
    (tmp_path / "t.npz").write_text("hello")
    for name, start in (("a.npy", b"\x93NUM"), ("t.npz", b"hell")):
        path = tmp_path / name
        with pytest.raises(ValueError) as info:
            load_checkpoint(path)
        assert str(info.value) == (f"checkpoint {str(path)!r} is not a grapheme checkpoint: "
                                   f"not a zip archive (it starts with {start!r})")
        assert "pickle" not in str(info.value)


def test_directory_and_unreadable_file(tmp_path):
    with pytest.raises(IsADirectoryError, match="is a directory, not a file"):
        load_checkpoint(tmp_path)
    with pytest.raises(OSError, match="File name too long"):   # not "No such file"
        load_checkpoint(tmp_path / ("x" * 300))
    with pytest.raises(IsADirectoryError, match="checkpoint path is a directory"):
        save_checkpoint(tmp_path, {}, {})
    # every atomic write names the path it was given, never its temporary
    # file (found by a new-user helper: Trainer(log=<a directory>))
    for path in (str(tmp_path), str(tmp_path / "missing") + os.sep):
        with pytest.raises(IsADirectoryError, match=re.escape(repr(path))):
            with _atomic_open(path) as f:
                f.write(b"x")
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    path = tmp_path / "c.npz"
    save_checkpoint(path, {}, {})
    if os.geteuid() != 0:   # root reads anything
        path.chmod(0)
        with pytest.raises(PermissionError, match="Permission denied"):
            load_checkpoint(path)


def test_member_names_do_not_collide(tmp_path):
    path = tmp_path / "c.npz"
    save_checkpoint(path, {"a.npy": np.zeros(1), "a": np.ones(1), "a.npy.npy": np.full(1, 2.0)},
                    {})
    arrays, _ = load_checkpoint(path)
    assert {k: v.tolist() for k, v in arrays.items()} == {
        "a.npy": [0.0], "a": [1.0], "a.npy.npy": [2.0]}


def test_file_mode_follows_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        save_checkpoint(tmp_path / "c.npz", {}, {})
    finally:
        os.umask(old)
    assert (tmp_path / "c.npz").stat().st_mode & 0o777 == 0o640
    old = os.umask(0o002)
    try:
        save_checkpoint(tmp_path / "c.npz", {}, {})
    finally:
        os.umask(old)
    assert (tmp_path / "c.npz").stat().st_mode & 0o777 == 0o664


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_directory_for_a_runs_file_is_named_before_training(tmp_path, overwrite):
    """A directory given for the log or the checkpoint is an
    IsADirectoryError naming it, before any epoch, whatever ``overwrite``
    says. (Found by an attack helper: it was "already exists ... pass
    overwrite=True", whose advice then failed after an epoch of training.)"""
    import grapheme as gr

    pairs = [("abc", "abc")] * 4

    def trainer(**kw):
        return gr.Trainer(gr.Embedding(dim=4, seed=0), gr.Morpher(), gr.StructuralLoss(),
                          gr.Adam(), progress=False, overwrite=overwrite, **kw)

    for t, checkpoint in ((trainer(log=tmp_path), None), (trainer(), tmp_path)):
        with pytest.raises(IsADirectoryError, match=re.escape(repr(str(tmp_path)))):
            t.fit(pairs, 1, checkpoint=checkpoint)
        assert t.epoch == 0 and not t.history
    assert os.listdir(tmp_path) == []


def test_stale_temporaries_are_cleaned(tmp_path):
    import subprocess
    import sys

    from grapheme.checkpoint import _temp_name

    path = tmp_path / "c.npz"
    # a writer that died mid-save (its pid no longer exists)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = _temp_name(path).replace(f"-{os.getpid()}.", f"-{dead.pid}.")
    with open(stale, "wb") as f:
        f.write(b"half a checkpoint")
    # a live writer (this process) and an unrelated file are left alone
    live = _temp_name(path)
    with open(live, "wb") as f:
        f.write(b"being written")
    other = tmp_path / ".other.npz.x-1.abc.tmp"
    other.write_bytes(b"")
    save_checkpoint(path, {"x": np.ones(2)}, {})
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["c.npz", os.path.basename(live), other.name])


def test_bounded_memory_on_load(tmp_path):
    """A header promising more data than its member holds is refused before
    anything of that size is allocated; so is a compressed member."""
    import zipfile

    path = tmp_path / "c.npz"
    save_checkpoint(path, {"x": np.zeros(4)}, {})
    data = path.read_bytes()
    # the header of x says (4,); make it say (2**40,)
    bad = tmp_path / "huge.npz"
    import io
    src = zipfile.ZipFile(io.BytesIO(data))
    with zipfile.ZipFile(bad, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            body = src.read(info)
            if info.filename == "x.npy":
                body = body.replace(b"'shape': (4,), ", b"'shape': (1099511627776,), ")
            dst.writestr(info.filename, body)
    with pytest.raises(ValueError, match=r"corrupted or truncated: array 'x': its header "
                                         r"promises 8796093022208 bytes of data, the "
                                         r"member holds \d+"):
        load_checkpoint(bad)
    with zipfile.ZipFile(bad, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    with pytest.raises(ValueError, match=r"array '(x|__meta__)' is compressed"):
        load_checkpoint(bad)


def test_zero_width_items_are_refused(tmp_path):
    """S0 and U0 hold any shape in 0 bytes: a 54 KB file reserved 20 GB of
    address space, or failed allocating 37 GiB (an attack helper's find)."""
    import io
    import zipfile

    path = tmp_path / "z.npz"
    save_checkpoint(path, {"x": np.zeros(4)}, {})
    src = zipfile.ZipFile(io.BytesIO(path.read_bytes()))
    for descr in ("|S0", "<U0"):
        header = {"descr": descr, "fortran_order": False, "shape": (100000, 100000)}
        buf = io.BytesIO()
        np.lib.format.write_array_header_1_0(buf, header)
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as dst:
            for info in src.infolist():
                dst.writestr(info.filename, buf.getvalue() if info.filename == "x.npy"
                             else src.read(info))
        with pytest.raises(ValueError, match=r"corrupted or truncated: array 'x' has dtype "
                                             r"\S+, of zero-width items"):
            load_checkpoint(path)


def test_deeply_nested_or_huge_meta_is_refused(tmp_path):
    import zipfile
    import io

    path = tmp_path / "c.npz"
    for text, reason in ((b"[" * 100000 + b"]" * 100000, "nested too deeply"),
                         (b'{"x": ' + b"9" * 5000 + b"}", "not valid JSON")):
        buf = io.BytesIO()
        np.save(buf, np.frombuffer(text, np.uint8))
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
            z.writestr("__meta__.npy", buf.getvalue())
        with pytest.raises(ValueError, match=reason):
            load_checkpoint(path)


def test_object_array_in_file_is_refused(tmp_path):
    path = tmp_path / "o.npz"
    np.savez(path, x=np.array([{"a": 1}], dtype=object))
    _expect_corrupted(path)
