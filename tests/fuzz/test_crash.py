"""Child-process runs of the scenarios that could crash the interpreter.

A segfault, an abort or an escaped exception in a child fails one test
here with the child's exit status and the end of its stderr, instead of
taking the test run down.
"""
import os
import subprocess
import sys

import pytest

from fuzzing import ROUNDS, SEEDS
from scenarios import SCENARIOS

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.parametrize("seed", list(SEEDS))
@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_scenario_survives_in_a_child(name, seed):
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(HERE))
    import grapheme   # the child imports the same grapheme as this process

    package_parent = os.path.dirname(os.path.dirname(grapheme.__file__))
    env["PYTHONPATH"] = os.pathsep.join(
        [package_parent, root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "scenarios.py"), name, str(seed), str(ROUNDS)],
        capture_output=True, text=True, env=env, timeout=600)
    tail = "\n".join(proc.stderr.splitlines()[-15:])
    assert proc.returncode == 0, f"child exited with {proc.returncode}:\n{tail}"
    assert proc.stdout.strip() == "ok", tail
