"""Hypothesis profiles for the property suite; pick one with HYPOTHESIS_PROFILE.

- ``dev`` (default): quick enough that the whole suite runs in well under a minute.
- ``ci``: more examples, no example database (CI machines start clean anyway),
  reproduction blobs printed on failure.
- ``soak``: long randomized runs to hunt rare disagreements (minutes to hours).
"""

from __future__ import annotations

import os
from hypothesis import HealthCheck, settings

# Generating merge histories draws many values per example; that is not a bug.
_SLOW_DATA = [HealthCheck.too_slow, HealthCheck.data_too_large]

settings.register_profile("dev", max_examples=100, deadline=None, suppress_health_check=_SLOW_DATA)
settings.register_profile(
    "ci",
    max_examples=400,
    deadline=None,
    database=None,
    print_blob=True,  # a failure in CI prints a @reproduce_failure line to replay locally
    suppress_health_check=_SLOW_DATA,
)
settings.register_profile(
    "soak", max_examples=20_000, deadline=None, suppress_health_check=_SLOW_DATA
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))
