import os
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

# Shared helpers (tests/helpers.py) import as plain modules; with
# --import-mode=importlib only this folder, never the source tree, is added.
sys.path.insert(0, os.path.dirname(__file__))

# Deterministic in CI (as scipy does): same examples every run, no database.
settings.register_profile(
    "ci", derandomize=True, database=None, deadline=None, max_examples=60,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", deadline=None, max_examples=100)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


@pytest.fixture(params=[np.int32, np.int64], ids=["int32", "int64"])
def index_dtype(request):
    return request.param
