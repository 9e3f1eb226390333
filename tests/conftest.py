"""Settings for every test: hypothesis never judges a test by how long an example took (a
busy machine makes any example slow; timing figures belong in bench/)."""

from __future__ import annotations

from hypothesis import HealthCheck, settings

settings.register_profile(
    "pagetrack", deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("pagetrack")
