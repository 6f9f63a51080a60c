"""Profiles of the fuzzing suite.

CI (default): deterministic, small, the whole suite in well under two
minutes on two cores. Long (``GRAPHEME_FUZZ=long``): many more examples,
random seeds, more child-process rounds; a benchmark-style job (see
``docs/security.md``), not part of the ordinary test run.
"""
import os

from hypothesis import HealthCheck, settings

LONG = os.environ.get("GRAPHEME_FUZZ", "").lower() == "long"

#: Examples per hypothesis test.
EXAMPLES = 2000 if LONG else 150
#: Rounds per child-process scenario and seeds per scenario.
ROUNDS = 300 if LONG else 30
SEEDS = range(8) if LONG else range(2)

fuzz = settings(
    max_examples=EXAMPLES,
    derandomize=not LONG,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                           HealthCheck.data_too_large],
)


def one_line(exc):
    """The message of ``exc``: non-empty, one line."""
    message = str(exc)
    assert message and "\n" not in message, repr(message)
    return message
