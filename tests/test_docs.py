"""The examples in README.md and in the docstrings run and say what they claim."""
import doctest
import importlib
import pathlib
import re

import pytest

import grapheme

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
MODULES = ["graph", "history", "ops", "encoder", "estimators", "rate", "morph", "embedding", "testing",
           "loss", "optim", "data", "checkpoint", "train", "train.trainer", "train.state",
           "train.metrics", "cli"]


def test_readme_python_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the examples write run/...
    namespace = {}
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    assert blocks
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    assert (tmp_path / "run" / "checkpoint.npz").exists()


@pytest.mark.parametrize("name", MODULES + ["torch"])
def test_docstring_examples(name):
    if name == "torch":
        pytest.importorskip("torch")
    module = importlib.import_module(f"grapheme.{name}")
    result = doctest.testmod(module, extraglobs=vars(grapheme), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
