"""docs/security.md: the promises about untrusted files hold, and every test
the page cites exists."""
import io
import pathlib
import pickle
import re
import zipfile

import numpy as np
import pytest

from grapheme.checkpoint import load_checkpoint

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "security.md"


class _Payload:
    """Unpickling this writes a marker file: proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.write_text, (pathlib.Path(self.marker), "pwned"))


def test_a_pickle_payload_is_never_run(tmp_path):
    marker = tmp_path / "marker"
    payload = np.array([_Payload(str(marker))], dtype=object)
    buf = io.BytesIO()
    np.save(buf, payload, allow_pickle=True)
    meta = io.BytesIO()
    np.save(meta, np.frombuffer(b'{"format": "grapheme-checkpoint", "version": 1, '
                                b'"meta": {}}', np.uint8))
    path = tmp_path / "evil.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("x.npy", buf.getvalue())
        z.writestr("__meta__.npy", meta.getvalue())
    with pytest.raises(ValueError, match=r"array 'x' has dtype object \(only numbers and "
                                         r"strings are read: no pickle\)"):
        load_checkpoint(path)
    assert not marker.exists()
    # and a raw pickle file is not a zip archive at all
    raw = tmp_path / "evil.pkl"
    raw.write_bytes(pickle.dumps(_Payload(str(marker))))
    with pytest.raises(ValueError, match="is not a grapheme checkpoint: not a zip archive"):
        load_checkpoint(raw)
    assert not marker.exists()


def test_the_page_is_linked_from_the_readme():
    assert "(docs/security.md)" in (ROOT / "README.md").read_text(encoding="utf-8")


def test_every_cited_test_exists():
    text = DOC.read_text(encoding="utf-8")
    cited = re.findall(r"`(tests/[\w/]+\.py)(?:::(\w+))?`", text)
    assert len(cited) >= 10
    current = None
    for path, name in cited:
        source = (ROOT / path).read_text(encoding="utf-8")
        current = source
        if name:
            assert re.search(rf"^def {name}\(", source, re.M), f"{path}::{name}"
    # bare names after a file refer to tests of the file cited last before them
    for block in re.findall(r"\*Tests:\*(.*?)(?:\n\n|\Z)", text, re.S):
        last = None
        for path, name in re.findall(r"`(?:(tests/[\w/]+\.py)::)?(\w+)`", block):
            if path:
                last = (ROOT / path).read_text(encoding="utf-8")
            elif last is not None and name.startswith("test_"):
                assert re.search(rf"^def {name}\(", last, re.M), name
    assert current is not None
