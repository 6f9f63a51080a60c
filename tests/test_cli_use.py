"""The command line of a trained model: segment, plot, show; help, version, progress."""
import argparse
import io
import json

import pytest

import grapheme as gr
from grapheme.cli import _line_batches, build_parser, main


def run(capsys, *argv):
    code = main(list(map(str, argv)))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small run: its directory (metrics.jsonl, checkpoint.npz) and a model file."""
    root = tmp_path_factory.mktemp("use")
    assert main(["generate", "--task", "words", "--out", str(root / "data"), "--corpus",
                 *[str(_doc(root, i)) for i in range(3)]]) == 0
    assert main(["train", "--data", str(root / "data"), "--epochs", "2", "--out",
                 str(root / "run"), "--dim", "8", "--encoder-layers", "1",
                 "--no-progress"]) == 0
    gr.Segmenter.load(root / "run" / "checkpoint.npz").save(root / "model.npz")
    return root


def _doc(root, i):
    path = root / f"doc{i}.txt"
    path.write_text(" ".join(["the cat sat on the mat", "a dog ran in the park",
                              "we read the book"][i % 3] for _ in range(30)))
    return path


def test_every_option_has_help_text():
    def walk(parser, where):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for choice in action._choices_actions:
                    assert choice.help, f"{where} {choice.dest}: a command without help"
                for name, sub in action.choices.items():
                    walk(sub, f"{where} {name}")
            elif not isinstance(action, argparse._HelpAction):
                assert action.help, f"{where} {action.option_strings or action.dest}"
    walk(build_parser(), "grapheme")


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out == f"grapheme {gr.__version__}\n"


def test_segment_texts_from_arguments(trained, capsys):
    model = gr.Segmenter.load(trained / "model.npz")
    texts = ["thecatsat", "", "ondogé"]
    code, out, _ = run(capsys, "segment", "--model", trained / "model.npz", *texts)
    assert code == 0
    assert out.split("\n") == [" ".join(s) for s in model.segment(texts)] + [""]
    code, out, _ = run(capsys, "segment", "--model", trained / "run" / "checkpoint.npz",
                       "--sep", " | ", "thecatsat")
    assert out == " | ".join(model.segment("thecatsat")) + "\n"


def test_segment_streams_standard_input(trained, capsys, monkeypatch):
    model = gr.Segmenter.load(trained / "model.npz")
    lines = ["thecatsatonthemat", "", "adogranintheparkwereadthebook" * 3, "x"] * 50
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(lines)))   # no final newline
    code, out, _ = run(capsys, "segment", "--model", trained / "model.npz", "--sep", "/",
                       "--batch-chars", 100)
    assert code == 0
    assert out.split("\n")[:-1] == ["/".join(s) for s in model.segment(lines)]


def test_line_batches_read_as_the_lines_come():
    class Stream:
        def __init__(self, text):
            self.text, self.reads = text, 0

        def read(self, n):
            self.reads += 1
            chunk, self.text = self.text[:n], self.text[n:]
            return chunk

    stream = Stream("ab\ncd\nef" * 100)
    batches = _line_batches(stream, 10)
    assert next(batches) == ["ab", "cd"] and stream.reads == 1
    rest = [line for batch in batches for line in batch]
    assert ["ab", "cd"] + rest == ("ab\ncd\nef" * 100).split("\n")


def test_plot_and_show_write_pngs_and_never_overwrite(trained, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "m.png"
    assert run(capsys, "plot", trained / "run", "--out", out)[0] == 0
    png = out.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    code, _, err = run(capsys, "plot", trained / "run" / "metrics.jsonl", "--out", out)
    assert code == 2 and "already exists" in err and out.read_bytes() == png
    assert run(capsys, "plot", trained / "run" / "metrics.jsonl", "--out", out,
               "--overwrite")[0] == 0
    shown = tmp_path / "s.png"
    code, text, _ = run(capsys, "show", "--model", trained / "model.npz", "thecatsatonthemat",
                        "--out", shown)
    assert code == 0 and "wrote" in text
    png = shown.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2_000
    assert run(capsys, "show", "--model", trained / "model.npz", "x", "--out", shown)[0] == 2
    assert shown.read_bytes() == png
    code, _, err = run(capsys, "plot", tmp_path / "nothing")
    assert code == 2 and "no metrics file" in err and err.count("\n") == 1


def test_plot_default_output_beside_the_metrics(trained, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_bytes((trained / "run" / "metrics.jsonl").read_bytes())
    assert run(capsys, "plot", run_dir)[0] == 0
    assert (run_dir / "metrics.png").read_bytes()[:4] == b"\x89PNG"


def test_missing_matplotlib_is_one_clear_line(trained, tmp_path, capsys, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    code, _, err = run(capsys, "plot", trained / "run", "--out", tmp_path / "p.png")
    assert code == 2
    assert err == ('grapheme plot: error: drawing needs matplotlib: pip install matplotlib '
                   '(the "plot" extra: pip install ".[plot]" in a checkout)\n')
    assert not (tmp_path / "p.png").exists()


def test_resume_with_nothing_to_do_names_no_unwritten_file(trained, tmp_path, capsys):
    ckpt = trained / "run" / "checkpoint.npz"
    code, out, _ = run(capsys, "train", "--data", trained / "data", "--epochs", 2, "--out",
                       tmp_path / "elsewhere", "--resume", ckpt, "--no-progress")
    assert code == 0
    assert out == f"nothing to do: {ckpt} already has 2 epochs (--epochs 2)\n"
    assert not (tmp_path / "elsewhere").exists()


def test_training_reports_one_line_per_epoch_off_a_terminal(trained, tmp_path, capsys):
    code, out, err = run(capsys, "train", "--data", trained / "data", "--epochs", 3,
                         "--out", tmp_path / "r", "--dim", 8)
    assert code == 0
    lines = err.splitlines()
    assert [x.split(":")[0] for x in lines[:3]] == ["epoch 1/3", "epoch 2/3", "epoch 3/3"]
    assert all("loss" in x and "val_boundary_f1" in x and x.endswith(" s)")
               for x in lines[:3])
    assert lines[3].startswith("trained epochs 1-3 in ")
    assert "untrained -> epoch 3" in lines[3] and len(lines) == 4
    # the kept fraction, everywhere under that name
    assert "kept fraction" in out and "kept_fraction" in out and "merge" not in out
    record = json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[0])
    assert "kept_fraction" in record and "val_kept_fraction" in record


def test_progress_bar_on_a_terminal_keeps_its_summary():
    from grapheme.train.progress import Progress

    class Tty(io.StringIO):
        def isatty(self):
            return True

    stream = Tty()
    p = Progress("auto", 4, 2, stream=stream)
    assert p.mode == "bar"
    for epoch in (1, 2):
        p.step()
        p.step()
        p.epoch({"epoch": epoch, "loss": 1.0 / epoch, "val_accuracy": 0.5, "time": 0.1})
    p.close("trained epochs 1-2 ...")
    text = stream.getvalue()
    assert "epoch 2/2" in text and "val_accuracy=0.5000" in text
    assert text.endswith("trained epochs 1-2 ...\n")
    assert Progress(None, 4, 2, stream=stream).mode is None


def test_target_kept_fraction_and_its_old_name(trained, tmp_path, capsys):
    for flag in ("--target-kept-fraction", "--target-rate"):
        out = tmp_path / flag.strip("-")
        assert run(capsys, "train", "--data", trained / "data", "--epochs", 1, "--out", out,
                   "--dim", 8, flag, 0.6, "--no-progress")[0] == 0
        trainer = gr.Trainer.from_checkpoint(out / "checkpoint.npz", progress=False)
        assert trainer.morpher.rate.target == 0.6


def test_demo_explains_its_columns(capsys):
    code, out, _ = run(capsys, "demo", "--epochs", 1)
    assert code == 0
    for column in ("first loss, final loss:", "merges learned:", "threshold tau:", "exact:"):
        assert sum(line.startswith(column) for line in out.splitlines()) == 1, column
