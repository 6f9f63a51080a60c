"""Tests for grapheme.data: generation, determinism, atomic writes, parsing."""
import json
import os

import pytest

from grapheme.data import DEFAULT_TASKS, DEMO_PAIRS, TASKS, generate, load_pairs, make_pairs, write_pairs


def test_demo_pairs():
    assert DEMO_PAIRS == [("abc", "ab"), ("xyz", "xy"), ("123", "12")]


def test_arithmetic_is_correct_level1_polish_notation():
    pairs = make_pairs(500, seed=3, tasks="arithmetic")
    ops = set()
    for source, target in pairs:
        assert source.startswith("(") and source.endswith(")")
        op, a, b = source[1:-1].split(" ")
        ops.add(op)
        a, b = int(a), int(b)
        assert 1 <= a <= 20 and 1 <= b <= 20
        assert int(target) == {"+": a + b, "-": a - b, "*": a * b}[op]
    assert ops == {"+", "-", "*"}


def test_dedup_collapses_runs():
    for source, target in make_pairs(300, seed=4, tasks="dedup"):
        collapsed = "".join(c for i, c in enumerate(source) if i == 0 or source[i - 1] != c)
        assert target == collapsed
        assert len(target) >= 2


def test_fold_drops_last_character():
    for source, target in make_pairs(300, seed=5, tasks="fold"):
        assert len(source) >= 2 and target == source[:-1]


def _kinds(pairs):
    return {"arithmetic" if s.startswith("(") else "fold" if t == s[:-1] else "dedup"
            for s, t in pairs}


def test_tasks_are_mixed():
    assert _kinds(make_pairs(300, seed=6, tasks=list(TASKS))) == set(TASKS)


def test_default_mix_leaves_out_the_arithmetic_control():
    """A morph keeps characters of its input, so arithmetic targets are
    (mostly) unreachable: the task is a control, asked for by name only."""
    assert DEFAULT_TASKS == ("dedup", "fold")
    assert _kinds(make_pairs(300, seed=6)) == {"dedup", "fold"}
    unreachable = [t for s, t in make_pairs(500, seed=3, tasks="arithmetic")
                   if not set(t) <= set(s)]
    assert len(unreachable) > 250


def test_generate_deterministic_and_round_trips(tmp_path):
    p1 = generate(tmp_path / "a", n_train=50, n_val=10, seed=7)
    p2 = generate(tmp_path / "b", n_train=50, n_val=10, seed=7)
    p3 = generate(tmp_path / "c", n_train=50, n_val=10, seed=8)
    for key in ("train", "val"):
        with open(p1[key], "rb") as f1, open(p2[key], "rb") as f2:
            assert f1.read() == f2.read()
    train, val = load_pairs(p1["train"]), load_pairs(p1["val"])
    assert len(train) == 50 and len(val) == 10
    assert train != load_pairs(p3["train"])
    assert train[:10] != val
    # No temporary files are left behind.
    assert sorted(os.listdir(tmp_path / "a")) == ["train.jsonl", "val.jsonl"]


def test_generate_validation(tmp_path):
    with pytest.raises(ValueError, match="n_train must be >= 0"):
        generate(tmp_path, n_train=-1)
    with pytest.raises(TypeError, match="n_val must be an int"):
        generate(tmp_path, n_val=2.5)
    with pytest.raises(ValueError, match="unknown task 'poetry'"):
        generate(tmp_path, tasks=["poetry"])
    with pytest.raises(ValueError, match="seed"):
        generate(tmp_path, seed=-1)
    assert os.listdir(tmp_path) == []


def test_write_is_atomic_on_failure(tmp_path):
    path = tmp_path / "d.jsonl"
    write_pairs(path, [("a", "b")])
    with pytest.raises(ValueError, match=r"pairs\[1\]\[1\] must be a string"):
        write_pairs(path, [("x", "y"), ("z", 3)])
    # The old file survives intact and no temporary file is left.
    assert load_pairs(path) == [("a", "b")]
    assert os.listdir(tmp_path) == ["d.jsonl"]


def test_unicode_round_trip(tmp_path):
    pairs = [("żółć", "żół"), ("日本語", "日本"), ("a\U0001F600b", ""), ("", "")]
    write_pairs(tmp_path / "u.jsonl", pairs)
    assert load_pairs(tmp_path / "u.jsonl") == pairs


def test_blank_lines_and_extra_keys(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"input": "ab", "target": "a", "id": 1}\n\n  \n'
                    '{"target": "c", "input": "cd"}', encoding="utf-8")
    assert load_pairs(path) == [("ab", "a"), ("cd", "c")]


@pytest.mark.parametrize("line, reason", [
    (b'{"input": "ab", "target": }', "invalid JSON"),
    (b'["ab", "a"]', "expected a JSON object, got list"),
    (b'{"input": "ab"}', "missing key 'target'"),
    (b'{"target": "ab"}', "missing key 'input'"),
    (b'{"input": 3, "target": "a"}', "'input' must be a string, got int"),
    (b'{"input": "a", "target": null}', "'target' must be a string, got NoneType"),
    (b'{"input": "\\ud800", "target": "a"}', "'input' contains a lone surrogate"),
    (b'{"input": "a\xff", "target": "a"}', "invalid UTF-8"),
])
def test_malformed_line_names_file_and_line(tmp_path, line, reason):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"input": "ab", "target": "a"}\n\n' + line + b"\n")
    with pytest.raises(ValueError) as info:
        load_pairs(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}:3: ")
    assert reason in msg


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_pairs(tmp_path / "nope.jsonl")


def test_written_lines_are_plain_json(tmp_path):
    paths = generate(tmp_path, n_train=5, n_val=0, seed=0)
    with open(paths["train"], encoding="utf-8") as f:
        lines = f.read().splitlines()
    assert len(lines) == 5
    assert all(set(json.loads(x)) == {"input", "target"} for x in lines)
    assert load_pairs(paths["val"]) == []
