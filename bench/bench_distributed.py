"""Data-parallel training step: compute and communication, measured.

``python bench/bench_distributed.py [--nproc 1 2] [--batch 32 256] [--steps 40]``
runs, for every process count p and global batch B, p local ranks (gloo over
127.0.0.1) of the ``grapheme train`` model (d = 64, a 2-layer encoder,
``ste``, the training loss, Adam) on short fold pairs, and prints one JSON
line per (p, B) with medians over the steps (after 5 warm-up steps):

- ``step``: wall time of a training step (rank 0);
- ``allreduce``: time inside the step's all-reduce calls, waiting for the
  slower rank included;
- ``compute``: ``step - allreduce``;
- ``cpu``: CPU time of rank 0's process per step (all its threads): what
  the step costs when the rank has a core to itself;
- ``wire``: a bare all-reduce of the same buffer right after a barrier (the
  communication itself, without the wait);
- ``floats``: the buffer's length (gradients + the 7 ``SHARD_SUMS``), ``table_rows``.

The docs (docs/scaling.md) quote its output.
"""
import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def _pairs(n, seed=42):
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    out = []
    for _ in range(n):
        t = "".join(rng.choice(letters, size=int(rng.integers(2, 9))).tolist())
        out.append((t, t[:-1]))
    return out


def _rank(batch, steps, warmup=5):
    import grapheme as gr
    from grapheme.distributed import Communicator, init_from_env, destroy

    comm = init_from_env("gloo")

    class Timed(Communicator):
        rank, world_size = comm.rank, comm.world_size

        def __init__(self):
            self.seconds, self.floats = 0.0, 0

        def all_reduce(self, buffer):
            start = time.perf_counter()
            comm.all_reduce(buffer)
            self.seconds += time.perf_counter() - start
            self.floats = max(self.floats, buffer.size)

    timed = Timed()
    trainer = gr.Trainer(gr.Embedding(dim=64, seed=0), gr.Morpher(estimator="ste"),
                         gr.StructuralLoss.for_training(), gr.Adam(lr=1e-2),
                         batch_size=batch, seed=0, encoder=gr.Encoder(64, layers=2),
                         unknown_prob=0.01, progress=False, comm=timed)
    pairs = _pairs(batch * (steps + warmup))
    trainer._grow([a for a, _ in pairs], [b for _, b in pairs])
    step_t, comm_t, cpu_t = [], [], []
    for i in range(steps + warmup):
        chunk = pairs[i * batch:(i + 1) * batch]
        timed.all_reduce(np.zeros(1))          # line the ranks up
        timed.seconds = 0.0
        start, cpu = time.perf_counter(), time.process_time()
        trainer._shard_step([a for a, _ in chunk], [b for _, b in chunk], grown=True)
        elapsed = time.perf_counter() - start
        if i >= warmup:
            cpu_t.append(time.process_time() - cpu)
            step_t.append(elapsed)
            comm_t.append(timed.seconds)
    buf = np.zeros(timed.floats)
    wire = []
    for _ in range(steps):
        comm.all_reduce(np.zeros(1))
        start = time.perf_counter()
        comm.all_reduce(buf)
        wire.append(time.perf_counter() - start)
    if comm.rank == 0:
        med = statistics.median
        print(json.dumps({
            "nproc": comm.world_size, "batch": batch, "steps": steps,
            "step_ms": 1e3 * med(step_t), "allreduce_ms": 1e3 * med(comm_t),
            "compute_ms": 1e3 * med(s - c for s, c in zip(step_t, comm_t)),
            "cpu_ms": 1e3 * med(cpu_t),
            "wire_ms": 1e3 * med(wire), "floats": timed.floats,
            "table_rows": trainer.embedding.weight.shape[0],
            "load_avg": os.getloadavg()[0]}), flush=True)
    destroy()


def project(floats, compute_ms, ranks, gbps=10.0, alpha_us=50.0):
    """The projected step of ``ranks`` ranks, each with the compute of
    ``compute_ms``: ``{"ring": (comm_ms, efficiency), "tree": ...}``.

    All-reduce of ``M = 8 floats`` bytes at ``gbps`` Gb/s with a per-message
    latency ``alpha_us``: ring ``2 (p-1)/p M / bw + 2 (p-1) alpha``;
    halving-doubling ``2 (p-1)/p M / bw + 2 log2(p) alpha``. Efficiency:
    compute / (compute + comm), nothing overlapped (the step all-reduces
    after its backward pass).
    """
    import math

    M, bw, a = 8.0 * floats, gbps * 1e9 / 8, alpha_us * 1e-6
    volume = 2 * (ranks - 1) / ranks * M / bw
    out = {}
    for name, hops in (("ring", 2 * (ranks - 1)), ("tree", 2 * math.log2(ranks))):
        comm = 1e3 * (volume + hops * a)
        out[name] = (comm, compute_ms / (compute_ms + comm))
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch", type=int, nargs="+", default=[32, 256])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--project", metavar="JSONL", default=None,
                        help="print the projection of docs/scaling.md from the 1-process "
                             "lines of this output (10 Gb/s, 50 us latency)")
    parser.add_argument("--rank", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.project:
        with open(args.project) as f:
            runs = [json.loads(line) for line in f if line.startswith("{")]
        for run in runs:
            if run["nproc"] != 1:
                continue
            for p in (8, 64, 512):
                proj = project(run["floats"], run["compute_ms"], p)
                print(f"b={run['batch']:4d}/rank compute {run['compute_ms']:6.2f} ms  "
                      f"p={p:3d}  " + "  ".join(f"{k}: comm {c:6.2f} ms eff {e:.2f}"
                                                 for k, (c, e) in proj.items()))
        return 0
    if args.rank:
        return _rank(args.batch[0], args.steps)
    from grapheme.distributed import spawn_local

    for batch in args.batch:
        for p in args.nproc:
            code = spawn_local([sys.executable, os.path.abspath(__file__), "--rank",
                                "--batch", str(batch), "--steps", str(args.steps)], p,
                               threads=1)
            if code:
                return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
