"""Run grapheme's benchmarks without asv: ``python -m bench``.

Usage::

    python setup.py build_ext --inplace -q
    PYTHONPATH=$PWD python -m bench [--quick] [--filter REGEX] [--json FILE]

The same files also run under airspeed velocity
(``asv run --python=same --quick``); this runner exists so that a benchmark
and its peer are measured in one run, side by side, and their ratio printed.

Conventions (those of asv, as in scipy ``benchmarks/`` and pandas ``asv_bench``)
------------------------------------------------------------------------------
* Every module ``bench/bench_*.py`` is discovered. In it, every class that has
  ``time_*``, ``peakmem_*`` or ``track_*`` methods is a benchmark suite.
* ``params``: a list of value lists, one per parameter (a flat list means a
  single parameter), named by ``param_names``. Every combination is run.
  A parameter named ``n`` is a problem size: the table then also shows the
  time per node, and the per-node time at the largest ``n`` relative to
  ``n = 100_000`` (when both ran), to expose non-linear scaling.
* ``setup(*params)`` builds the data (``np.random.default_rng(42)``);
  ``teardown(*params)`` is called after. ``setup`` raising
  ``NotImplementedError`` skips that combination.
  ``setup_cache()`` (optional) runs once per class in its own subprocess; its
  (pickled) result is passed as the first argument of ``setup``, ``teardown``
  and every benchmark method, as asv does.
* ``time_*`` methods hold only the call measured. ``track_*`` methods return
  a number that is recorded. ``peakmem_*`` methods are run once.
* ``timeout`` (seconds, default 60) bounds one method; asv's sampling
  attributes (``number``, ``repeat``, ...) are ignored here.

Ratios (ours / peer)
--------------------
For every pair of methods of one class, the ratio of their results is printed
per parameter combination (for ``peakmem_`` pairs, of their tracemalloc peaks:
the RSS growth of small problems is 0 when freed memory is reused). Pairs come from, in this order:

1. an explicit class attribute ``ratios = [(ours, peer), ...]``; an entry may
   carry a third element, the target: the largest acceptable ratio (e.g.
   ``("time_scatter", "time_add_at", 0.1)`` means ours must be >= 10x
   faster); each ratio is then marked ``ok`` or ``MISS``. When ``ratios`` is
   defined (even empty) it is the complete list;
2. otherwise the naming convention: ``time_X`` (ours) is paired with every
   ``time_X_<peer>`` of the class (likewise ``peakmem_X`` with
   ``peakmem_X_<peer>``).

A ratio below 1 means ours is faster (or smaller).

Measurement
-----------
Every (class, parameter combination) runs in a fresh subprocess, so data of
one size never inflates the memory of the next.

* time: ``time.perf_counter``. A first call calibrates ``number``, the calls
  per sample, so that a sample lasts at least 20 ms (a single call at large
  sizes); then samples are taken until 7 are collected, or 3 of them and
  2 seconds were spent. The table gives the best sample divided by
  ``number`` (and the spread, median/best - 1). With ``--quick``: the
  calibration call, then one sample only (``number`` calls summing to
  >= 1 ms, a single call at large sizes), and only the smallest and largest
  value of every parameter. The calibration call is never reported: a first
  call pays for first-touch page faults of fresh memory (on a VM, up to 5x
  the kernel time at n = 1e7), which would swamp the comparison.
* peakmem: each method in its own fresh subprocess, after ``setup``: the
  resident-set high-water mark is reset (``/proc/self/clear_refs``), the
  method called once, and the peak RSS *growth* over the RSS before the call
  reported (Linux; elsewhere the column says ``n/a``). Beside it, the peak of
  the allocations ``tracemalloc`` saw during a second call (numpy reports its
  array buffers to tracemalloc).
"""
import argparse
import gc
import importlib
import inspect
import itertools
import json
import math
import os
import pickle
import platform
import re
import subprocess
import sys
import tempfile
import time
import traceback

PREFIXES = ("time_", "peakmem_", "track_")
MARK = "@@bench "
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PACKAGE = os.path.basename(HERE)

MIN_SAMPLE = 0.020        # seconds per timing sample (full run)
MIN_SAMPLE_QUICK = 0.001  # seconds per timing sample (--quick)
REPEAT_MIN, REPEAT_MAX, BUDGET = 3, 7, 2.0
DEFAULT_TIMEOUT = 60.0
REFERENCE_N = 100_000


# --------------------------------------------------------------------- discovery
def module_names():
    return sorted(f[:-3] for f in os.listdir(HERE)
                  if f.startswith("bench_") and f.endswith(".py"))


def suites(module):
    """Benchmark classes of a module, in source order."""
    out = []
    for name, obj in vars(module).items():
        if (inspect.isclass(obj) and obj.__module__ == module.__name__
                and not name.startswith("_") and methods_of(obj)):
            out.append((name, obj))
    return out


def methods_of(cls):
    return [m for m in dir(cls) if m.startswith(PREFIXES) and callable(getattr(cls, m))]


def param_axes(cls):
    """``(names, value lists)``; ``([], [])`` for an unparametrised class."""
    params = getattr(cls, "params", None)
    if not params:
        return [], []
    if not all(isinstance(p, (list, tuple)) for p in params):
        params = [params]
    names = list(getattr(cls, "param_names", []) or [])
    names += [f"param{i + 1}" for i in range(len(names), len(params))]
    return names, [list(p) for p in params]


def quick_indices(values):
    """Indices of the smallest and largest value (first and last if unordered)."""
    try:
        order = sorted(range(len(values)), key=lambda i: values[i])
    except TypeError:
        order = list(range(len(values)))
    return sorted({order[0], order[-1]})


def combinations(axes, quick):
    choices = [quick_indices(v) if quick else range(len(v)) for v in axes]
    return list(itertools.product(*choices))


def format_params(names, axes, combo):
    return ", ".join(f"{n}={axes[a][i]!r}" for a, (n, i) in enumerate(zip(names, combo)))


def peer_pairs(cls, methods):
    """``[(ours, peer, target or None)]`` for the methods present."""
    present = set(methods)
    if hasattr(cls, "ratios"):
        pairs = [(r[0], r[1], r[2] if len(r) > 2 else None) for r in cls.ratios]
    else:
        pairs = [(a, b, None) for a in sorted(present) for b in sorted(present)
                 if a.startswith(("time_", "peakmem_")) and b.startswith(a + "_")]
    return [p for p in pairs if p[0] in present and p[1] in present]


# ------------------------------------------------------------------------ worker
def emit(**record):
    sys.stdout.write(MARK + json.dumps(record) + "\n")
    sys.stdout.flush()


def read_status():
    """``{'VmRSS': bytes, 'VmHWM': bytes}`` from /proc (Linux), else {}."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out[key] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return out


def reset_peak_rss():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _time_call(fn, args, quick, timeout):
    t0 = time.perf_counter()
    fn(*args)
    first = time.perf_counter() - t0
    floor = MIN_SAMPLE_QUICK if quick else MIN_SAMPLE
    number = max(1, math.ceil(floor / max(first, 1e-9)))
    samples = []
    start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        for _ in range(number):
            fn(*args)
        samples.append((time.perf_counter() - t0) / number)
        spent = time.perf_counter() - start
        if quick or len(samples) >= REPEAT_MAX:
            break
        if len(samples) >= REPEAT_MIN and spent > BUDGET:
            break
        if spent + samples[-1] * number > timeout:
            break
    return samples, number


def worker(spec):
    module = importlib.import_module(f"{PACKAGE}.{spec['module']}")
    cls = getattr(module, spec["cls"])
    names, axes = param_axes(cls)
    args = tuple(axes[a][i] for a, i in enumerate(spec["combo"]))
    if spec["mode"] == "cache":
        value = cls().setup_cache()
        with open(spec["cache"], "wb") as f:
            pickle.dump(value, f, protocol=pickle.HIGHEST_PROTOCOL)
        return
    if spec.get("cache"):
        with open(spec["cache"], "rb") as f:
            args = (pickle.load(f),) + args
    obj = cls()
    timeout = float(getattr(cls, "timeout", DEFAULT_TIMEOUT))
    try:
        if hasattr(obj, "setup"):
            obj.setup(*args)
    except NotImplementedError:
        for m in spec["methods"]:
            emit(method=m, status="skipped")
        return
    try:
        for m in spec["methods"]:
            fn = getattr(obj, m)
            try:
                if m.startswith("time_"):
                    samples, number = _time_call(fn, args, spec["quick"], timeout)
                    emit(method=m, status="ok", value=min(samples), unit="s",
                         samples=samples, number=number)
                elif m.startswith("track_"):
                    emit(method=m, status="ok", value=float(fn(*args)),
                         unit=getattr(fn, "unit", ""))
                else:
                    emit(method=m, status="ok", unit="bytes", **peakmem(fn, args))
            except Exception:
                emit(method=m, status="error", error=traceback.format_exc(limit=3))
    finally:
        if hasattr(obj, "teardown"):
            obj.teardown(*args)


def peakmem(fn, args):
    import tracemalloc

    gc.collect()
    before = read_status().get("VmRSS")
    rss = None
    if before is not None and reset_peak_rss():
        fn(*args)
        rss = read_status()["VmHWM"] - before
    tracemalloc.start()
    fn(*args)
    traced = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    value = rss if rss is not None else traced
    return {"value": value, "rss_growth": rss, "tracemalloc": traced,
            "how": "rss" if rss is not None else "tracemalloc"}


# ------------------------------------------------------------------------ parent
def run_worker(spec, timeout):
    """Run one worker subprocess; ``(records, error text or None)``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    proc = subprocess.Popen([sys.executable, "-m", PACKAGE, "--worker", json.dumps(spec)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        problem = None if proc.returncode == 0 else (err.strip() or f"exit {proc.returncode}")
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        problem = f"timeout after {timeout:.0f} s"
    records = [json.loads(line[len(MARK):]) for line in out.splitlines()
               if line.startswith(MARK)]
    return records, problem


def format_time(seconds):
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6), ("ns", 1e-9)):
        if seconds >= scale or unit == "ns":
            return f"{seconds / scale:7.3f} {unit}"


def format_bytes(b):
    if b is None:
        return "n/a"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(b) >= scale:
            return f"{b / scale:7.1f} {unit}"
    return f"{b:7d} B"


def describe(record):
    if record["status"] != "ok":
        return record["status"]
    m = record["method"]
    if m.startswith("time_"):
        s = sorted(record["samples"])
        spread = s[len(s) // 2] / s[0] - 1.0 if len(s) > 1 else float("nan")
        tail = f"(best of {len(s)}x{record['number']}" + (
            f", spread {spread:.0%})" if len(s) > 1 else ")")
        return f"{format_time(record['value'])}  {tail}"
    if m.startswith("peakmem_"):
        return (f"{format_bytes(record['rss_growth'])} RSS growth  "
                f"(tracemalloc peak {format_bytes(record['tracemalloc'])})")
    return f"{record['value']:g} {record.get('unit', '')}".rstrip()


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="one sample per benchmark; smallest and largest parameters only")
    parser.add_argument("--filter", "-b", default="",
                        help="regex searched in 'module.Class.method'")
    parser.add_argument("--json", metavar="FILE", help="also write all results here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if opts.worker:
        worker(json.loads(opts.worker))
        return 0

    pattern = re.compile(opts.filter)
    results, ratios, failures = [], [], []
    t_start = time.perf_counter()
    print(f"grapheme benchmarks ({'quick' if opts.quick else 'full'}); python "
          f"{platform.python_version()}, {os.cpu_count()} cpus. time: best sample / calls, "
          "time.perf_counter; peakmem: peak RSS growth in a fresh subprocess "
          "(+ tracemalloc peak).")
    if hasattr(os, "getloadavg") and os.getloadavg()[0] > 0.5:
        print(f"WARNING: load average {os.getloadavg()[0]:.2f} at start; another process "
              "shares the cpus and the timings (and the GIL ratios) will be off.")
    for modname in module_names():
        try:
            module = importlib.import_module(f"{PACKAGE}.{modname}")
        except Exception as exc:
            print(f"\n{modname}: not importable, skipped ({type(exc).__name__}: {exc})")
            failures.append(f"{modname}: import error")
            continue
        for clsname, cls in suites(module):
            methods = [m for m in methods_of(cls)
                       if pattern.search(f"{modname}.{clsname}.{m}")]
            if not methods:
                continue
            names, axes = param_axes(cls)
            timeout = float(getattr(cls, "timeout", DEFAULT_TIMEOUT))
            print(f"\n{modname}.{clsname}")
            cache = None
            if hasattr(cls, "setup_cache"):
                fd, cache = tempfile.mkstemp(suffix=".pickle", prefix="bench-cache-")
                os.close(fd)
                _, problem = run_worker({"module": modname, "cls": clsname, "mode": "cache",
                                         "combo": [], "cache": cache}, 4 * timeout)
                if problem:
                    print(f"  setup_cache failed: {problem}")
                    failures.append(f"{modname}.{clsname}.setup_cache")
                    continue
            fast = [m for m in methods if not m.startswith("peakmem_")]
            mem = [m for m in methods if m.startswith("peakmem_")]
            pairs = peer_pairs(cls, methods)
            for combo in combinations(axes, opts.quick):
                label = format_params(names, axes, combo)
                n = None
                if "n" in names:
                    n = axes[names.index("n")][combo[names.index("n")]]
                got = {}
                jobs = ([(fast, (len(fast) + 2) * timeout)] if fast else []) + [
                    ([m], 3 * timeout) for m in mem]
                for group, limit in jobs:
                    spec = {"module": modname, "cls": clsname, "mode": "run",
                            "combo": list(combo), "methods": group, "quick": opts.quick,
                            "cache": cache}
                    records, problem = run_worker(spec, limit)
                    for r in records:
                        got[r["method"]] = r
                    for m in group:
                        if m not in got:
                            got[m] = {"method": m, "status": "error", "error": problem}
                for m in methods:
                    r = got[m]
                    per = ""
                    if (r["status"] == "ok" and m.startswith("time_")
                            and isinstance(n, int) and n > 0):
                        per = f"  {r['value'] / n * 1e9:8.2f} ns/node"
                    print(f"  {m:<34} {label:<14} {describe(r)}{per}")
                    if r["status"] == "error":
                        print("    " + (r.get("error") or "").strip().replace("\n", "\n    "))
                        failures.append(f"{modname}.{clsname}.{m} [{label}]")
                    results.append(dict(r, benchmark=f"{modname}.{clsname}.{m}",
                                        params=dict(zip(names, (axes[a][i] for a, i in
                                                                enumerate(combo)))),
                                        n=n))
                for ours, peer, target in pairs:
                    a, b = got[ours], got[peer]
                    if a["status"] != "ok" or b["status"] != "ok":
                        continue
                    # memory: compare the allocations (tracemalloc), as the RSS
                    # growth of small problems is 0 when freed memory is reused
                    key = "tracemalloc" if ours.startswith("peakmem_") else "value"
                    if not a[key] or not b[key]:
                        continue
                    ratio = a[key] / b[key]
                    ratios.append({"class": f"{modname}.{clsname}", "ours": ours,
                                   "peer": peer, "params": label, "ratio": ratio,
                                   "target": target,
                                   "ok": None if target is None else ratio <= target})
            if cache:
                os.unlink(cache)
            scaling(results, f"{modname}.{clsname}.")

    print_ratios(ratios)
    elapsed = time.perf_counter() - t_start
    load = f", load average {os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else ""
    print(f"\n{len(results)} results, {len(failures)} failures, {elapsed:.0f} s{load}")
    for f in failures:
        print(f"  FAILED {f}")
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump({"quick": opts.quick, "python": platform.python_version(),
                       "cpus": os.cpu_count(), "elapsed": elapsed, "results": results,
                       "ratios": ratios, "failures": failures}, f, indent=1)
    return 1 if failures else 0


def scaling(results, prefix):
    """Per-node time at the largest n over that at REFERENCE_N, per time_ method."""
    by = {}
    for r in results:
        if (r["benchmark"].startswith(prefix) and r["status"] == "ok"
                and r["method"].startswith("time_") and isinstance(r["n"], int)):
            rest = tuple(sorted((k, repr(v)) for k, v in r["params"].items() if k != "n"))
            by.setdefault((r["method"], rest), {})[r["n"]] = r["value"] / r["n"]
    lines = []
    for (m, rest), per in by.items():
        top = max(per)
        if REFERENCE_N in per and top > REFERENCE_N:
            extra = "".join(f", {k}={v}" for k, v in rest)
            lines.append(f"    {m}{extra}: per-node time at n={top} is "
                         f"{per[top] / per[REFERENCE_N]:.2f}x that at n={REFERENCE_N}")
    if lines:
        print("  scaling:")
        print("\n".join(lines))


def print_ratios(ratios):
    if not ratios:
        return
    print("\nratios ours/peer (< 1: ours faster or smaller)")
    width = max(len(f"{r['class']}: {r['ours']} / {r['peer']}") for r in ratios)
    for r in ratios:
        pair = f"{r['class']}: {r['ours']} / {r['peer']}"
        verdict = ""
        if r["target"] is not None:
            verdict = f"  target <= {r['target']:g}: {'ok' if r['ok'] else 'MISS'}"
        print(f"  {pair:<{width}}  {r['params']:<14} {r['ratio']:8.3f}"
              f"  ({1 / r['ratio']:7.2f}x){verdict}")


if __name__ == "__main__":
    sys.exit(main())
