"""What the property tests share: how many examples (from $TCPGC_FUZZ_EXAMPLES: 100 by
default, so that the unit tier stays a quick local run; CI sets 10000), the settings,
the per-test timeout, and the service names they generate."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

EXAMPLES = int(os.environ.get("TCPGC_FUZZ_EXAMPLES", "100"))

# ~5 ms an example on a slow machine; the default per-test timeout is sized for 500.
timeout = pytest.mark.timeout(max(180, EXAMPLES // 20))

fuzz = settings(
    max_examples=EXAMPLES,
    deadline=None,
    # Large generated inputs are the point here, not a problem.
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

NAME_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_."
names = st.text(alphabet=NAME_CHARS, min_size=1, max_size=64)
