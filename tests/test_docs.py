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
           "train.metrics", "train.progress", "segmenter", "cli", "distributed", "plot"]


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


def _readme_commands():
    """Every ``grapheme ...`` line of the README's bash blocks, as argv lists."""
    import shlex

    lines = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(encoding="utf-8"), re.S):
        for line in block.splitlines():
            line = line.split("#", 1)[0].strip()
            for part in line.split("&&"):
                words = shlex.split(part)
                if words and words[0] == "grapheme":
                    lines.append(words[1:])
    return lines


def test_readme_commands_parse():
    """Every command the README shows is one the CLI accepts as written."""
    from grapheme.cli import build_parser

    commands = _readme_commands()
    assert len(commands) >= 7
    parser = build_parser()
    for argv in commands:
        if argv == ["--version"]:   # prints the version and exits 0
            with pytest.raises(SystemExit, match="0"):
                parser.parse_args(argv)
            continue
        parser.parse_args(argv)


def test_readme_generated_task_commands_run(tmp_path, monkeypatch):
    """The generated-task lines run as written, epochs cut to 2 (the word-task
    lines take minutes; they are parsed above and exercised in test_cli.py)."""
    from grapheme.cli import main

    monkeypatch.chdir(tmp_path)
    for argv in _readme_commands():
        if "words" in " ".join(argv) or argv[0] == "demo":
            continue
        if "--epochs" in argv:
            argv = list(argv)
            argv[argv.index("--epochs") + 1] = "2"
        assert main(argv + (["--no-progress"] if argv[0] == "train" else [])) == 0, argv
