"""Run grapheme's benchmarks with asv, then print the ratios against peers.

From the checkout, with grapheme and asv installed in this interpreter::

    python -m bench [--quick] [--bench REGEX]   # asv run, then the ratios of that run
    python -m bench --ratios-only               # the ratios of the latest run, no run

asv times the grapheme installed in this interpreter (``asv run --python=same``,
started from the checkout's parent folder so that the source tree is not on
its path; asv strips PYTHONPATH). It keeps such results only under a commit:
they go to ``.asv/results/`` under the checkout's ``HEAD`` (a label only).

Peers: a class lists ``ratios = [(ours, peer), ...]``, two of its ``time_``
methods; for every pair and parameter combination ``peer time / our time``
is printed (above 1: ours is faster), both from the same run. An optional
third element is the smallest acceptable ratio (``("time_scatter",
"time_add_at", 10)``: ours must be 10x faster), marked ``ok`` or ``MISS``;
an optional fourth, ``{parameter name: value}``, limits that target to the
parameter combinations it names (the others get the ratio alone).
A benchmark that errors is failed in asv's report, and ``failed`` here.
"""
import argparse
import ast
import glob
import itertools
import json
import math
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CONFIG = os.path.join(ROOT, "asv.conf.json")
RESULTS = os.path.join(ROOT, ".asv", "results")  # results_dir of asv.conf.json
LAST_RUN = os.path.join(ROOT, ".asv", "last-bench-run.json")


def declared_ratios():
    """``{"module.Class": [(ours, peer, target or None, where or None)]}``,
    read with ``ast``: neither the benchmark modules nor grapheme are
    imported here."""
    out = {}
    for path in sorted(glob.glob(os.path.join(HERE, "bench_*.py"))):
        module = os.path.basename(path)[:-3]
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
            for stmt in cls.body:
                if isinstance(stmt, ast.Assign) and getattr(stmt.targets[0], "id", "") == "ratios":
                    out[f"{module}.{cls.name}"] = [
                        (p[0], p[1], p[2] if len(p) > 2 else None, p[3] if len(p) > 3 else None)
                        for p in ast.literal_eval(stmt.value)]
    return out


def load_results(since):
    """``(path, {benchmark: {param combination: value}})`` of the newest results
    file, keeping the benchmarks started at or after ``since`` (ms)."""
    files = [p for p in glob.glob(os.path.join(RESULTS, "*", "*.json"))
             if os.path.basename(p) != "machine.json"]
    if not files:
        return None, {}
    path = max(files, key=os.path.getmtime)
    with open(path) as f:
        data = json.load(f)
    col = {c: i for i, c in enumerate(data["result_columns"])}
    out = {}
    for name, row in data["results"].items():
        started = row[col["started_at"]] if len(row) > col["started_at"] else None
        if started is None or started < since:
            continue
        combos = list(itertools.product(*row[col["params"]]))
        values = row[col["result"]] or [None] * len(combos)
        out[name] = dict(zip(combos, values))
    return path, out


def describe(ours, peer, target, names):
    """``peer / ours`` against the target, or why there is no ratio."""
    for name, value in zip(names, (ours, peer)):
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return f"{'failed' if value is None else 'skipped'}: {name}"
    ratio = peer / ours
    return f"{ratio:.2f}x" + ("" if target is None else
                              f"  (target >= {target:g}: {'ok' if ratio >= target else 'MISS'})")


def print_ratios(since):
    """Print the ratios of the results since ``since``; 1 (an exit status)
    where there are no results, else 0."""
    path, results = load_results(since)
    if path is None:
        print(f"\nno asv results in {RESULTS}", file=sys.stderr)
        return 1
    with open(os.path.join(RESULTS, "benchmarks.json")) as f:  # written with the results
        param_names = {k: v["param_names"] for k, v in json.load(f).items() if k != "version"}
    rows = []  # (class, "peer / ours", parameters, ratio or why not)
    for cls, pairs in declared_ratios().items():
        for ours, peer, target, where in pairs:
            a, b = results.get(f"{cls}.{ours}"), results.get(f"{cls}.{peer}")
            for combo in (a or b or {}):  # neither ran: not part of this run
                named = dict(zip(param_names.get(f"{cls}.{ours}", []), combo))
                label = ", ".join(f"{n}={v}" for n, v in named.items())
                # asv keeps parameter values as their repr
                aimed = where is None or all(named.get(n) == repr(v) for n, v in where.items())
                text = (f"not run: {peer if b is None else ours}" if a is None or b is None
                        else describe(a.get(combo), b.get(combo), target if aimed else None,
                                      (ours, peer)))
                rows.append((cls, f"{peer} / {ours}", label, text))
    print(f"\nratios peer time / our time (above 1: ours faster), {os.path.relpath(path)}")
    if not rows:
        print("  (no benchmark with a peer was run)")
        return 0
    w1, w2 = (max(len(r[i]) for r in rows) for i in (1, 2))
    for i, (cls, pair, label, text) in enumerate(rows):
        if i == 0 or rows[i - 1][0] != cls:
            print(cls)
        print(f"  {pair:<{w1}}  {label:<{w2}}  {text}")
    return 0


def run_asv(quick, bench):
    asv = [sys.executable, "-m", "asv"]
    parent = os.path.dirname(ROOT)
    if not os.path.exists(os.path.expanduser("~/.asv-machine.json")):
        subprocess.run(asv + ["machine", "--yes", "--config", CONFIG], cwd=parent, check=True)
    head = subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=ROOT, text=True).strip()
    cmd = asv + ["run", "--config", CONFIG, "--python=same", "--show-stderr",
                 "--set-commit-hash", head] + ["--quick"] * quick
    cmd += ["--bench", bench] if bench else []
    print("$ python " + " ".join(cmd[1:]), flush=True)
    return subprocess.run(cmd, cwd=parent).returncode


def main(argv=None):
    parser = argparse.ArgumentParser("python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="asv --quick: one call each")
    parser.add_argument("--bench", "-b", "--filter", metavar="REGEX",
                        help="asv --bench: the benchmarks whose name matches (old: --filter)")
    parser.add_argument("--ratios-only", action="store_true",
                        help="the ratios of the latest run, without running")
    opts = parser.parse_args(argv)
    if opts.ratios_only:  # the benchmarks of the last `python -m bench` run
        try:
            with open(LAST_RUN) as f:
                since = json.load(f)["since"]
        except (OSError, ValueError, KeyError):
            since = 0  # results not written by this script: all of the newest file
        return print_ratios(since)
    since = math.floor(time.time() * 1000)  # as asv's started_at: ms since the epoch
    code = run_asv(opts.quick, opts.bench)
    with open(LAST_RUN, "w") as f:  # in .asv/, made by asv for its results
        json.dump({"since": since}, f)
    missing = print_ratios(since)
    return code or missing


if __name__ == "__main__":
    sys.exit(main())
