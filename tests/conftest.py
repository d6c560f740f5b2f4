"""Test configuration: hypothesis profiles.

``default``: what CI runs: derandomized (the same examples every run, so CI is
reproducible), no deadline (onnxruntime session creation time varies). ``long``:
the thorough run with fresh random examples, ``pytest --hypothesis-profile=long``.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings

settings.register_profile(
    "default",
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile(
    "long",
    parent=settings.get_profile("default"),
    derandomize=False,
    max_examples=10_000,
)
settings.load_profile("default")
