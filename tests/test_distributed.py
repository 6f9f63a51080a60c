"""Data-parallel training (grapheme.distributed, Trainer(comm=...)):
two processes over the loopback interface reach the parameters of one
process with the same global batch, and ``grapheme train --nproc 2``
writes one run."""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import grapheme

pytest.importorskip("torch.distributed")

import grapheme as gr
from grapheme.distributed import Communicator, shard_bounds

import distributed_worker as worker

HERE = os.path.dirname(os.path.abspath(__file__))
TIMEOUT = 120


def _env():
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    # the children import the grapheme these tests import: the installed one
    # (CI), or an in-place build; never an uncompiled checkout before it (so
    # they also run in this folder, not in the checkout: `-c` and `-m` put
    # the working directory first on sys.path)
    root = os.path.dirname(os.path.dirname(os.path.abspath(grapheme.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def _run_ranks(command, nproc=2):
    """Run ``command`` as ``nproc`` local ranks in a child process (so a
    hang is killed by the timeout): its exit status."""
    script = ("import sys; from grapheme.distributed import spawn_local; "
              f"sys.exit(spawn_local({command!r}, {nproc}))")
    return subprocess.run([sys.executable, "-c", script], env=_env(), cwd=HERE,
                          timeout=TIMEOUT).returncode


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ranks")
    code = _run_ranks([sys.executable, os.path.join(HERE, "distributed_worker.py"),
                       str(out)])
    assert code == 0
    return [dict(np.load(out / f"rank{r}.npz")) for r in range(2)]


def _relative(got, want):
    """``|got - want| / |want|`` (Euclidean norms), NaNs where both have them."""
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan)
    scale = np.linalg.norm(want[~nan])
    diff = np.linalg.norm(got[~nan] - want[~nan])
    return diff / scale if scale else diff


@pytest.mark.parametrize("name", sorted(worker.configurations()))
def test_two_ranks_reach_the_single_process_run(two_ranks, name, tmp_path):
    """Parameters, the estimator's state, the epoch records (validation
    included) and the kept best epoch: the ranks agree bit for bit, and with
    one process to 1e-12 relative (counts, the sample stream and the
    metrics that are ratios of counts exactly)."""
    configuration = worker.configurations()[name]
    single = worker.train(configuration, str(tmp_path))
    factory, pairs = configuration[:2]
    fresh = factory(None)
    fresh._grow([p[0] for p in pairs], [p[1] for p in pairs])   # the rows fit adds
    init = fresh._params()
    assert sorted(single) == sorted(k.split("/", 1)[1] for k in two_ranks[0]
                                    if k.startswith(name + "/"))
    for key, want in single.items():
        got0, got1 = two_ranks[0][f"{name}/{key}"], two_ranks[1][f"{name}/{key}"]
        assert np.array_equal(got0, got1, equal_nan=True), key   # the ranks agree
        if key in worker.EXACT:
            assert np.array_equal(got0, want, equal_nan=True), key
        else:
            assert _relative(got0, want) <= 1e-12, key
    # and the runs trained: the table moved
    moved = single["embedding"] - init["embedding"]
    assert np.abs(moved).max() > 1e-3
    assert "val_loss" in single and "best_epoch" in single
    if name.startswith("reinforce"):
        K = fresh.morpher.estimator.samples
        assert int(single["estimator.count"]) == worker.EPOCHS * worker.PAIRS_N * K
        assert np.isfinite(single["estimator_variance"]).all()
        assert single["estimator_variance"].max() > 0


def test_shard_bounds_cover_the_batch():
    for n in range(0, 9):
        for p in range(1, 5):
            bounds = [shard_bounds(n, r, p) for r in range(p)]
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
            assert max(hi - lo for lo, hi in bounds) - min(hi - lo for lo, hi in bounds) <= 1


def test_trainer_comm_is_checked():
    def make(comm, estimator="ste"):
        return gr.Trainer(gr.Embedding(dim=4), gr.Morpher(estimator=estimator),
                          gr.StructuralLoss(), gr.Adam(), comm=comm)
    with pytest.raises(TypeError, match="comm must be"):
        make("gloo")
    assert make(Communicator(), estimator="reinforce").comm is not None


@pytest.mark.parametrize("name", ["ste_encoder", "reinforce_loo"])
def test_one_rank_communicator_is_the_single_process_run(name, tmp_path):
    """A trivial communicator (one rank, no peers) goes through the sharded
    step and the shared validation: the same run as the plain one, to
    rounding."""
    configuration = worker.configurations()[name]
    single = worker.train(configuration, str(tmp_path / "single"))
    alone = worker.train(configuration, str(tmp_path / "alone"), _Alone())
    for key, want in single.items():
        if key in worker.EXACT:
            assert np.array_equal(alone[key], want, equal_nan=True), key
        else:
            assert _relative(alone[key], want) <= 1e-12, key


class _Alone(Communicator):
    def all_reduce(self, buffer):
        pass


class _Threads(Communicator):
    """``world_size`` ranks as threads of this process: ``all_reduce`` sums
    the ranks' buffers in rank order."""

    def __init__(self, rank, shared):
        self.rank, self.shared = rank, shared
        self.world_size = len(shared["buffers"])

    def all_reduce(self, buffer):
        shared = self.shared
        shared["buffers"][self.rank] = buffer.copy()
        shared["barrier"].wait()
        total = np.sum(shared["buffers"], axis=0)
        shared["barrier"].wait()     # every rank has read before any writes again
        buffer[:] = total

    @staticmethod
    def run(functions, timeout=60):
        """Call ``functions[r](_Threads(r, ...))`` in one thread per rank:
        their results, by rank."""
        world = len(functions)
        shared = {"buffers": [None] * world,
                  "barrier": threading.Barrier(world, timeout=timeout)}
        results, errors = [None] * world, []

        def target(r):
            try:
                results[r] = functions[r](_Threads(r, shared))
            except BaseException as exc:   # noqa: BLE001 - re-raised below
                errors.append(exc)
                shared["barrier"].abort()

        threads = [threading.Thread(target=target, args=(r,)) for r in range(world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout)
        if errors:
            raise errors[0]
        return results


@pytest.mark.parametrize("name, n_val, world", [("segments", 7, 3), ("reinforce_loo", 2, 3),
                                                ("ste_encoder", 7, 2)])
def test_validation_is_split_between_ranks(name, n_val, world, monkeypatch):
    """Each rank evaluates only its contiguous share of val (none when val is
    shorter than the ranks), and every rank gets one process's record: the
    loss to 1e-12 relative, counts and the ratios of counts exactly."""
    factory, pairs, val, _ = worker.configurations()[name]
    val = val[:n_val]
    seen = []
    eval_sums = gr.Trainer._eval_sums

    def spy(self, inputs, targets, bs):
        seen.append(list(inputs))
        return eval_sums(self, inputs, targets, bs)

    texts = [p[0] for p in pairs], [p[1] for p in pairs]
    single = factory(None)
    single._grow(*texts)
    want = single._val_record(val)
    monkeypatch.setattr(gr.Trainer, "_eval_sums", spy)

    def rank(comm):
        trainer = factory(comm)
        trainer._grow(*texts)
        return trainer._val_record(val)

    records = _Threads.run([rank] * world)
    assert sorted(map(len, seen)) == sorted(hi - lo for lo, hi in
                                            (shard_bounds(n_val, r, world) for r in range(world)))
    assert sorted(x for part in seen for x in part) == sorted(p[0] for p in val)
    assert all(r == records[0] for r in records)
    assert sorted(records[0]) == sorted(want)
    if isinstance(pairs[0][1], tuple):
        assert "val_boundary_f1" in want
    for key, value in want.items():
        if key == "val_loss":
            assert records[0][key] == pytest.approx(value, rel=1e-12, abs=0)
        else:
            assert records[0][key] == value, key


@pytest.mark.parametrize("differ", ["seed", "estimator", "lr", "unknown_prob", "val",
                                    "epochs", "embedding_seed"])
def test_ranks_made_with_other_settings_are_refused(differ):
    """Found by an attack helper: ranks made with their own seed (a common
    habit elsewhere) sharded different shuffles, and other estimators,
    learning rates or validation pairs trained on silently; other batch
    sizes aborted in gloo. fit compares the settings before the first step."""
    pairs, val = worker._pairs(0), worker._val(0)

    def rank(comm):
        other = comm.rank == 1
        trainer = gr.Trainer(
            gr.Embedding(dim=4, seed=2 if other and differ == "embedding_seed" else 1),
            gr.Morpher(estimator="soft" if other and differ == "estimator" else "ste"),
            gr.StructuralLoss(), gr.Adam(lr=2e-2 if other and differ == "lr" else 1e-2),
            batch_size=6, seed=1 + (other and differ == "seed"), progress=False,
            unknown_prob=0.1 if other and differ == "unknown_prob" else 0.0, comm=comm)
        try:
            trainer.fit(pairs, 2 if other and differ == "epochs" else 1,
                        val=val[:3] if other and differ == "val" else val)
        except ValueError as exc:
            return str(exc), trainer.epoch
        return None, trainer.epoch

    for message, epoch in _Threads.run([rank] * 2):
        assert message is not None and message.startswith(
            "ranks disagree on the settings, the epochs or the validation pairs") and (
            epoch == 0)


def _write_pairs(path, pairs):
    with open(path, "w", encoding="utf-8") as f:
        for source, target in pairs:
            f.write(json.dumps({"input": source, "target": target}) + "\n")


def test_cli_nproc_2_writes_one_run_and_resumes(tmp_path):
    data = tmp_path / "train.jsonl"
    _write_pairs(data, worker._pairs(0))
    out = tmp_path / "run"
    args = [sys.executable, "-m", "grapheme.cli", "train", "--data", str(data),
            "--out", str(out), "--no-progress"]
    settings = ["--batch-size", "6", "--dim", "8"]
    done = subprocess.run(args + settings + ["--epochs", "1", "--nproc", "2"], env=_env(), cwd=HERE,
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("epoch 1 in") == 1             # one rank reports
    assert sorted(os.listdir(out)) == ["checkpoint.npz", "metrics.jsonl"]
    with open(out / "metrics.jsonl") as f:
        assert [json.loads(line)["epoch"] for line in f] == [1]
    resumed = subprocess.run(args + ["--epochs", "2", "--nproc", "2", "--resume",
                                     str(out / "checkpoint.npz")],
                             env=_env(), cwd=HERE, capture_output=True, text=True, timeout=TIMEOUT)
    assert resumed.returncode == 0, resumed.stderr
    assert sorted(os.listdir(out)) == ["checkpoint.npz", "metrics.jsonl"]
    with open(out / "metrics.jsonl") as f:
        assert [json.loads(line)["epoch"] for line in f] == [1, 2]
    # the same run in one process, for comparison: equal to rounding
    single_out = tmp_path / "single"
    args[args.index(str(out))] = str(single_out)
    done = subprocess.run(args + settings + ["--epochs", "2"], env=_env(), cwd=HERE, capture_output=True,
                          text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr
    a = gr.Segmenter.load(out / "checkpoint.npz").embedding.weight
    b = gr.Segmenter.load(single_out / "checkpoint.npz").embedding.weight
    assert np.linalg.norm(a - b) <= 1e-10 * np.linalg.norm(b)


def test_cli_nproc_2_trains_reinforce(tmp_path):
    """``--estimator reinforce --nproc 2`` (2 samples, leave-one-out
    baseline, validation, keeping the best): the one-process run."""
    data, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    _write_pairs(data, worker._pairs(0))
    _write_pairs(val, worker._val(0))
    runs = {}
    for nproc in (2, 1):
        out = tmp_path / f"run{nproc}"
        done = subprocess.run(
            [sys.executable, "-m", "grapheme.cli", "train", "--data", str(data), "--val",
             str(val), "--out", str(out), "--no-progress", "--batch-size", "6", "--dim", "8",
             "--encoder-layers", "1", "--epochs", "2", "--estimator", "reinforce",
             "--samples", "2", "--baseline", "loo", "--keep-best", "val_loss",
             "--nproc", str(nproc)],
            env=_env(), cwd=HERE, capture_output=True, text=True, timeout=TIMEOUT)
        assert done.returncode == 0, done.stderr
        assert done.stdout.count("epochs 1-2") == 1
        with open(out / "metrics.jsonl") as f:
            runs[nproc] = [json.loads(line) for line in f]
        runs[nproc, "weight"] = gr.Segmenter.load(out / "checkpoint.npz").embedding.weight
        runs[nproc, "best"] = gr.Segmenter.load(out / "best.npz").embedding.weight
    for a, b in zip(runs[2], runs[1]):
        assert a["estimator_variance"] > 0
        for key in ("loss", "estimator_variance", "val_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-10), key
        for key in ("kept_fraction", "val_kept_fraction", "val_accuracy"):
            assert a[key] == b[key], key
    for what in ("weight", "best"):
        a, b = runs[2, what], runs[1, what]
        assert np.linalg.norm(a - b) <= 1e-10 * np.linalg.norm(b)


def test_cli_nproc_refuses_an_existing_run_before_spawning(tmp_path):
    data = tmp_path / "train.jsonl"
    _write_pairs(data, worker._pairs(0))
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("{}\n")
    done = subprocess.run([sys.executable, "-m", "grapheme.cli", "train", "--data",
                           str(data), "--out", str(out), "--epochs", "1", "--nproc", "2"],
                          env=_env(), cwd=HERE, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 2
    assert "already holds a run" in done.stderr
    assert (out / "metrics.jsonl").read_text() == "{}\n"


def test_sharded_train_step_grows_the_table_as_one_process():
    """train_step called directly (not by fit): the table grows for the
    global batch's characters, in the one-process order."""
    factory, pairs = worker.configurations()["ste_encoder"][:2]
    plain, alone = factory(None), factory(_Alone())
    for lo in range(0, 18, 6):
        batch = [p[0] for p in pairs[lo:lo + 6]], [p[1] for p in pairs[lo:lo + 6]]
        a, b = plain.train_step(*batch), alone.train_step(*batch)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-12)
    assert np.array_equal(plain.embedding.codes, alone.embedding.codes)
    w = plain.embedding.weight
    assert np.linalg.norm(alone.embedding.weight - w) <= 1e-12 * np.linalg.norm(w)


# ------------------------------------------------- found by an attack helper
def test_launcher_arguments_are_checked(capsys):
    from grapheme.distributed import MAX_LOCAL_RANKS, check_rank, spawn_local

    cmd = [sys.executable, "-c", "pass"]
    for nproc, error in ((0, ValueError), (-3, ValueError), ("2", TypeError),
                         (2.0, TypeError), (True, TypeError),
                         (MAX_LOCAL_RANKS + 1, ValueError)):
        with pytest.raises(error, match="nproc"):
            spawn_local(cmd, nproc)      # before: -3 ran nothing and returned 0
    for threads in (0, -1, 1.5):
        with pytest.raises((TypeError, ValueError), match="threads"):
            spawn_local(cmd, 1, threads=threads)
    for command in ([], "python -c pass", [sys.executable, 3]):
        with pytest.raises(TypeError, match="command"):
            spawn_local(command, 1)
    for args, match in (((5, 2, 2), "rank must be < world_size"),
                        ((5, -1, 2), "rank must be >= 0"),
                        ((5, 0, 0), "world_size must be >= 1"),
                        ((-1, 0, 1), "n must be >= 0"),
                        ((5, 0.0, 1), "rank must be an integer")):
        with pytest.raises((TypeError, ValueError), match=match):
            shard_bounds(*args)
    assert check_rank(np.int64(1), 2) == (1, 2)

    class Outside(Communicator):
        rank, world_size = 2, 2
    with pytest.raises(ValueError, match=r"comm.rank must be < comm.world_size \(2\)"):
        gr.Trainer(gr.Embedding(dim=4), gr.Morpher(), gr.StructuralLoss(), gr.Adam(),
                   comm=Outside())
    from grapheme.cli import main
    assert main(["train", "--data", "x", "--out", "y", "--nproc", str(10 ** 9)]) == 2
    assert capsys.readouterr().err.endswith(
        "error: argument --nproc: must be <= 1024, got 1000000000\n")


@pytest.mark.parametrize("env, match", [
    ({"WORLD_SIZE": "2", "RANK": "5"}, "RANK in the environment must be < WORLD_SIZE"),
    ({"WORLD_SIZE": "2", "RANK": "-1"}, "RANK in the environment must be >= 0"),
    ({"WORLD_SIZE": "-1", "RANK": "0"}, "WORLD_SIZE in the environment must be >= 1"),
    ({"WORLD_SIZE": "two", "RANK": "0"}, "WORLD_SIZE='two' in the environment is not an"),
    ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_PORT": "0"}, "MASTER_PORT in the environment"),
])
def test_a_launch_outside_its_group_is_refused_before_joining(env, match, monkeypatch):
    # before: RANK >= WORLD_SIZE waited for the other ranks for ever
    from grapheme.distributed import init_from_env

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    with pytest.raises(ValueError, match=match):
        init_from_env()
    for var, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_PORT", "29500")):
        monkeypatch.setenv(var, value)
    with pytest.raises(ValueError, match="timeout must be > 0"):
        init_from_env(timeout=-1)


def test_cli_rank_outside_its_group_is_one_line(tmp_path):
    data = tmp_path / "train.jsonl"
    _write_pairs(data, worker._pairs(0))
    env = dict(_env(), WORLD_SIZE="2", RANK="5", MASTER_ADDR="127.0.0.1",
               MASTER_PORT="29500")
    done = subprocess.run([sys.executable, "-m", "grapheme.cli", "train", "--data",
                           str(data), "--out", str(tmp_path / "run"), "--epochs", "1"],
                          env=env, cwd=HERE, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        "grapheme train: error: RANK in the environment must be < WORLD_SIZE in the "
        "environment (2), got 5"]
    assert not (tmp_path / "run").exists()


POSIX = pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="POSIX signals")


def _launch_sleepers(tmp_path, rank_setup="pass", launcher_setup="pass", grace=10,
                     new_session=False):
    """A launcher (``spawn_local``) of two ranks that write their pid and
    sleep: the launcher's Popen and the ranks' pids, once both are up
    (``new_session``: the launcher leads a process group of its own)."""
    rank = (f"import os, signal, time; {rank_setup}; "
            f"open(os.path.join({str(tmp_path)!r}, os.environ['RANK'] + '.pid'), 'w')"
            ".write(str(os.getpid())); time.sleep(120)")
    script = (f"import signal, sys; {launcher_setup}; from grapheme.distributed import "
              f"spawn_local; sys.exit(spawn_local({[sys.executable, '-c', rank]!r}, 2, "
              f"grace={grace}))")
    launcher = subprocess.Popen([sys.executable, "-c", script], env=_env(), cwd=HERE,
                                start_new_session=new_session)
    deadline = time.monotonic() + TIMEOUT
    pids = [tmp_path / f"{r}.pid" for r in range(2)]
    while not all(p.exists() and p.read_text() for p in pids):
        if time.monotonic() > deadline or launcher.poll() is not None:
            launcher.kill()
            pytest.fail("the ranks did not start")
        time.sleep(0.05)
    return launcher, [int(p.read_text()) for p in pids]


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@POSIX
def test_sigterm_to_the_launcher_stops_its_ranks(tmp_path):
    # before: the launcher died and its ranks trained on, writing the run
    launcher, ranks = _launch_sleepers(tmp_path)
    try:
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(TIMEOUT) == 128 + signal.SIGTERM
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert not any(map(_alive, ranks))   # stopped and reaped by the launcher


@POSIX
def test_a_second_signal_does_not_cut_the_stop_short(tmp_path):
    # found in review: a SIGTERM during the stop after Ctrl-C raised in the
    # middle of it, and ranks that ignore SIGTERM were never killed
    launcher, ranks = _launch_sleepers(
        tmp_path, rank_setup="signal.signal(signal.SIGTERM, signal.SIG_IGN)", grace=1)
    try:
        launcher.send_signal(signal.SIGINT)
        time.sleep(0.3)
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(TIMEOUT) != 0
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert not any(map(_alive, ranks))   # killed after the grace


@POSIX
def test_ctrl_c_lets_the_ranks_end_by_themselves(tmp_path):
    """Found by a review helper: on Ctrl-C (SIGINT to the whole process
    group) the launcher terminated the ranks at once, so rank 0 never
    named its checkpoint nor removed its lock. The ranks now get the grace
    to end; one that ignores SIGINT is still stopped after it."""
    done = tmp_path / "cleaned"
    launcher, ranks = _launch_sleepers(
        tmp_path, grace=5, rank_setup=(
            "import sys\n"
            "def cleanup(*a):\n    time.sleep(1.0)\n"
            f"    open({str(done)!r} + os.environ['RANK'], 'w').close(); sys.exit(130)\n"
            "signal.signal(signal.SIGINT, cleanup) if os.environ['RANK'] == '0' else "
            "signal.signal(signal.SIGINT, signal.SIG_IGN)"), new_session=True)
    try:
        start = time.monotonic()
        os.killpg(launcher.pid, signal.SIGINT)
        assert launcher.wait(TIMEOUT) != 0
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert (tmp_path / "cleaned0").exists()   # rank 0 had the time to clean up
    assert not any(map(_alive, ranks))         # rank 1, which ignored it, was stopped
    assert time.monotonic() - start < TIMEOUT


@POSIX
def test_ctrl_c_under_nproc_is_said_once(tmp_path):
    """Left from stop 36: Ctrl-C under ``train --nproc 2`` printed rank 0's
    line (what is saved, how to go on), then the launcher's own
    "grapheme: interrupted"."""
    data = tmp_path / "train.jsonl"
    _write_pairs(data, worker._pairs(0))
    out = tmp_path / "run"
    launcher = subprocess.Popen(
        [sys.executable, "-m", "grapheme", "train", "--data", str(data), "--out", str(out),
         "--epochs", "100000", "--nproc", "2", "--no-progress", "--dim", "4"],
        env=_env(), cwd=HERE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        start_new_session=True,   # a terminal's process group, as Ctrl-C reaches it
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + TIMEOUT
        while not (out / "checkpoint.npz").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.killpg(launcher.pid, signal.SIGINT)
        _, err = launcher.communicate(timeout=TIMEOUT)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
    assert launcher.returncode == 128 + signal.SIGINT
    assert len(err.splitlines()) == 1, err
    assert err.startswith("grapheme: interrupted; epoch ") and "--resume" in err


@POSIX
def test_a_rank_killed_after_the_grace_is_named(capsys):
    """An attack helper's find: a rank that did not end after a stop was
    killed unsaid (and the launcher's grace was shorter than a stuck rank
    takes to end itself, saying so)."""
    from grapheme.distributed import _stop

    ignores = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
               "print(flush=True); time.sleep(60)")
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
             for code in ("import time; print(flush=True); time.sleep(60)", ignores)]
    for p in procs:
        p.stdout.readline()   # up, its handler set
    _stop(procs, 0.5)
    assert [p.returncode for p in procs] == [-signal.SIGTERM, -signal.SIGKILL]
    assert capsys.readouterr().err == ("rank 1 did not end within 0.5 s of the stop and was "
                                       "killed\n")
    for p in procs:
        p.stdout.close()


@POSIX
def test_nohup_keeps_sighup_ignored(tmp_path):
    # found in review: the launcher replaced nohup's SIG_IGN, so closing the
    # terminal stopped a run started with nohup
    launcher, ranks = _launch_sleepers(
        tmp_path, launcher_setup="signal.signal(signal.SIGHUP, signal.SIG_IGN)")
    try:
        launcher.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        assert launcher.poll() is None and all(map(_alive, ranks))
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(TIMEOUT) == 128 + signal.SIGTERM
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert not any(map(_alive, ranks))


def _launch(rank_code):
    """``spawn_local`` of two ranks running ``rank_code``: (status, stderr,
    seconds)."""
    script = ("import sys; from grapheme.distributed import spawn_local; "
              f"sys.exit(spawn_local({[sys.executable, '-c', rank_code]!r}, 2, grace=1))")
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script], env=_env(), cwd=HERE,
                          capture_output=True, text=True, timeout=TIMEOUT)
    return done.returncode, done.stderr, time.monotonic() - start


def test_a_resume_whose_best_file_only_rank_0_sees(tmp_path):
    """A review's find: every rank looked for the best file to decide
    whether its record goes on; a rank that did not see it (another
    machine, with a copy of the checkpoint alone) evaluated alone, a
    collective the others never joined, and gloo failed with "collective
    mismatch". Rank 0 decides for all."""
    import shutil

    data, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    _write_pairs(data, worker._pairs(0))
    _write_pairs(val, worker._val(0))
    common = ["train", "--data", str(data), "--val", str(val), "--out", "run", "--no-progress"]
    (tmp_path / "r0").mkdir()
    (tmp_path / "r1" / "run").mkdir(parents=True)
    done = subprocess.run([sys.executable, "-m", "grapheme", *common, "--epochs", "1",
                           "--keep-best", "val_loss", "--dim", "8"], env=_env(),
                          cwd=tmp_path / "r0",
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr
    shutil.copy(tmp_path / "r0" / "run" / "checkpoint.npz", tmp_path / "r1" / "run")
    argv = common + ["--epochs", "2", "--resume", "run/checkpoint.npz"]
    code, err, _ = _launch(
        "import os, sys\n"
        f"os.chdir(os.path.join({str(tmp_path)!r}, 'r' + os.environ['RANK']))\n"
        f"from grapheme.cli import main; sys.exit(main({argv!r}))")
    assert code == 0, err
    best = gr.Trainer.from_checkpoint(tmp_path / "r0" / "run" / "checkpoint.npz",
                                      progress=False).best
    assert best["metric"] == "val_loss" and best["epoch"] <= 2
    assert os.listdir(tmp_path / "r1" / "run") == ["checkpoint.npz"]   # never written


@POSIX
@pytest.mark.parametrize("how", ["error", "signal"])
def test_a_failing_rank_is_seen_while_rank_0_runs(how):
    """Found by an attack helper: only rank 0 was polled while it ran, so a
    rank > 0 that died left rank 0 waiting for it in a collective (until
    torch's 30-minute timeout), and a rank killed by a signal ended the
    launch with status 1 and nothing said."""
    fail = ("sys.exit('rank one failed')" if how == "error"
            else "os.kill(os.getpid(), signal.SIGKILL)")
    code, err, seconds = _launch(
        "import os, signal, sys, time\n"
        f"if os.environ['RANK'] == '1':\n    {fail}\n"
        "time.sleep(100)")
    assert seconds < 60
    if how == "error":
        assert code == 1 and "rank one failed" in err
    else:
        assert code == 128 + signal.SIGKILL
        assert "rank 1 of 2 was killed by signal SIGKILL" in err


@POSIX
def test_a_failing_rank_is_named_when_rank_0_is_the_console_script():
    """A review's find: rank 0 runs the console script, which raises the
    launcher's SIGTERM as Ctrl-C and exits 143 saying "stopped by SIGTERM";
    the failing rank's own message was then not shown."""
    code, err, _ = _launch(
        "import os, sys, time\n"
        "if os.environ['RANK'] == '1':\n    time.sleep(1); sys.exit('rank one failed')\n"
        "from grapheme import cli\n"
        "cli._load_model = lambda path: time.sleep(100)\n"
        "sys.argv = ['grapheme', 'segment', '--model', 'm.npz', 'abc']\n"
        "sys.exit(cli.run())")
    assert code == 1 and "rank one failed" in err and "stopped by SIGTERM" in err


@POSIX
def test_a_failing_rank_is_named_when_rank_0_had_to_be_killed():
    """Second review: a rank's message was shown only if rank 0 ended by
    SIGTERM; one that needed SIGKILL (a hung rank 0) left nothing said."""
    code, err, _ = _launch(
        "import os, signal, sys, time\n"
        "if os.environ['RANK'] == '1':\n    sys.exit('rank one failed')\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\ntime.sleep(100)")
    assert code == 1 and "rank one failed" in err


@POSIX
def test_spawn_local_puts_the_handlers_back():
    from grapheme.distributed import spawn_local

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGHUP)}
    assert spawn_local([sys.executable, "-c", "pass"], 2, env=_env()) == 0
    assert {sig: signal.getsignal(sig) for sig in before} == before


@pytest.mark.parametrize("world", ["0", "-1"])
def test_cli_world_size_below_one_is_named(world, monkeypatch, capsys, tmp_path):
    # found by an attack helper: blamed missing RANK, MASTER_ADDR, ... instead
    from grapheme.cli import main

    monkeypatch.setenv("WORLD_SIZE", world)
    for var in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    code = main(["train", "--data", str(tmp_path), "--epochs", "1", "--out",
                 str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and f"WORLD_SIZE={world} in the environment must be at least 1" in err


@pytest.mark.parametrize("options, named", [
    (["--timeout", "60"], "--timeout applies"),
    (["--backend", "gloo"], "--backend applies"),
    (["--backend", "nccl", "--timeout", "5"], "--backend, --timeout apply"),
    (["--nproc", "1", "--timeout", "5"], "--timeout applies"),   # a helper's find
])
def test_cli_data_parallel_options_alone_are_refused(options, named, monkeypatch, capsys,
                                                     tmp_path):
    """A review helper's find (left last session): without --nproc or a
    launcher they did nothing, silently."""
    from grapheme.cli import main

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    data = tmp_path / "train.jsonl"
    _write_pairs(data, worker._pairs(0))
    code = main(["train", "--data", str(data), "--epochs", "1", "--out",
                 str(tmp_path / "run"), "--no-progress", *options])
    err = capsys.readouterr().err
    assert code == 2 and err == (f"grapheme train: error: {named} to a data-parallel run "
                                 "(--nproc N above 1, or under torchrun)\n")
    assert not (tmp_path / "run").exists()


def test_nccl_without_a_gpu_is_one_line_before_any_rank(monkeypatch, capsys, tmp_path):
    """An attack helper's find: each spawned rank died in torch's
    set_device with AttributeError '_cuda_setDevice', two tracebacks."""
    import torch
    from grapheme import distributed
    from grapheme.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    spawned = []
    monkeypatch.setattr(distributed, "spawn_local", lambda *a, **k: spawned.append(a))
    data = tmp_path / "train.jsonl"
    _write_pairs(data, worker._pairs(0))
    code = main(["train", "--data", str(data), "--epochs", "1", "--out",
                 str(tmp_path / "run"), "--no-progress", "--nproc", "2", "--backend", "nccl"])
    err = capsys.readouterr().err
    assert code == 2 and err == ("grapheme train: error: --backend nccl: backend 'nccl' needs "
                                 "CUDA GPUs, and this torch sees none "
                                 "(torch.cuda.is_available() is False): use gloo on CPUs\n")
    assert not spawned and not (tmp_path / "run").exists()
    # one process too, and the one process of a launch is rank 0 (both were
    # taken: an attack helper's find)
    for argv, env, message in (
            (["--nproc", "1", "--backend", "nccl"], {}, "--backend applies to a data-parallel"),
            (["--backend", "nccl"], {"WORLD_SIZE": "1"}, "--backend nccl: backend 'nccl' needs"),
            ([], {"WORLD_SIZE": "1", "RANK": "1"},
             "RANK='1' in the environment is not a rank of WORLD_SIZE=1 (it must be 0)")):
        with monkeypatch.context() as patch:
            for k, v in env.items():
                patch.setenv(k, v)
            code = main(["train", "--data", str(data), "--epochs", "1", "--out",
                         str(tmp_path / "run"), "--no-progress", *argv])
        assert code == 2 and message in capsys.readouterr().err
        assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="backend 'nccl' needs CUDA GPUs"):
        distributed.init_from_env("nccl")
    distributed.check_backend("gloo")


def test_cli_timeout_ends_a_launch_whose_peers_never_come(tmp_path):
    """Found by an attack helper: rank 0 of a launch without its peers
    waited silently (torch's 30 minutes). --timeout bounds it, one line."""
    from grapheme.distributed import free_port

    data = tmp_path / "train.jsonl"
    _write_pairs(data, worker._pairs(0))
    env = dict(_env(), WORLD_SIZE="2", RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()))
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "grapheme.cli", "train", "--data", str(data),
                           "--epochs", "1", "--out", str(tmp_path / "run"), "--timeout", "2",
                           "--no-progress"], env=env, cwd=HERE, capture_output=True,
                          text=True, timeout=TIMEOUT)
    assert done.returncode == 2 and time.monotonic() - start < 60
    assert done.stderr.startswith("grapheme train: error: rank 0: ") and "Traceback" not in (
        done.stderr) and done.stderr.count("\n") == 1
    assert not (tmp_path / "run").exists()


@POSIX
def test_a_stop_ends_a_rank_waiting_for_its_peers(tmp_path):
    """An attack helper's find: a rank waiting in torch's rendezvous (or a
    collective) for a peer that never comes never returns to Python, so
    SIGTERM and Ctrl-C did nothing until the launch's timeout (30 minutes).
    The console script's watcher ends it a grace later, saying why."""
    import signal
    import socket
    from grapheme.distributed import free_port

    data = tmp_path / "train.jsonl"
    _write_pairs(data, worker._pairs(0))
    port = free_port()
    env = dict(_env(), WORLD_SIZE="2", RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port))
    boot = "import sys, grapheme.cli as c; c.STOP_GRACE = 1.0; sys.exit(c.run())"
    proc = subprocess.Popen([sys.executable, "-c", boot, "train", "--data", str(data),
                             "--epochs", "1", "--out", str(tmp_path / "run"), "--no-progress"],
                            env=env, cwd=HERE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:   # rank 0 serves the store: it is waiting
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None, proc.stderr.read()
                time.sleep(0.1)
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM
    assert err == ("grapheme: rank 0: SIGTERM did not end the rank within 1 s (it waits for "
                   "the other ranks inside torch, where Python cannot stop it): ended now; "
                   "its last checkpoint stands\n")


@POSIX
def test_cli_nproc_into_a_locked_out_says_so_on_every_rank(tmp_path):
    """Review: rank 0 refused the lock on its own, so the other ranks met
    a collective whose peer was gone ("Connection closed by peer"). The
    refusal is now agreed before any rank trains; a --resume's --lr is
    announced once (the launcher and the ranks' rank 0 both said it)."""
    data = tmp_path / "train.jsonl"
    _write_pairs(data, worker._pairs(0))
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import time; from grapheme.cli import _run_lock\n"
         f"with _run_lock({str(out)!r}):\n    print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, cwd=HERE, env=_env())
    train = [sys.executable, "-m", "grapheme.cli", "train", "--data", str(data),
             "--out", str(out), "--nproc", "2", "--no-progress", "--timeout", "60"]
    try:
        assert holder.stdout.readline() == "held\n"
        done = subprocess.run(train + ["--epochs", "1"], env=_env(), cwd=HERE,
                              capture_output=True, text=True, timeout=TIMEOUT)
        assert done.returncode == 2
        assert f"is being written by another grapheme train (pid {holder.pid})" in done.stderr
        assert "Connection" not in done.stderr
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    assert subprocess.run(train + ["--epochs", "1"], env=_env(), cwd=HERE,
                          capture_output=True, timeout=TIMEOUT).returncode == 0
    done = subprocess.run(train + ["--epochs", "2", "--resume", str(out / "checkpoint.npz"),
                                   "--lr", "1e-4"], env=_env(), cwd=HERE,
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0 and done.stdout.count("learning rate") == 1


def test_destroy_never_imports_torch(monkeypatch):
    """An attack helper's find: Ctrl-C during torch's import, then
    destroy() in train's ``finally`` imported the half-made module again and
    raised AttributeError over the interrupt, with a traceback."""
    import sys
    import types

    from grapheme import distributed

    monkeypatch.delitem(sys.modules, "torch.distributed", raising=False)
    distributed.destroy()
    assert "torch.distributed" not in sys.modules
    monkeypatch.setitem(sys.modules, "torch.distributed", types.ModuleType("torch.distributed"))
    distributed.destroy()   # half-made: nothing to leave
