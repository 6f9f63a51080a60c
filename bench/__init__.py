"""Benchmarks of grapheme, in the conventions of airspeed velocity (asv).

One module per area (``bench_core.py``, ``bench_loss.py``, ...). Run them with
``python -m bench`` (see ``bench/__main__.py``) or with asv (``asv.conf.json``
at the repository root).
"""
