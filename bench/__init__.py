"""Benchmarks of grapheme, in the conventions of airspeed velocity (asv).

One module per area (``bench_core.py``, ``bench_loss.py``, ...). asv runs them
(``asv.conf.json`` at the repository root); ``python -m bench`` runs asv and
prints the ratios against peers (see ``bench/__main__.py``).
"""
