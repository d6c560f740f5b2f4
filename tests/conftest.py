"""Test configuration: hypothesis profiles.

``default``: what CI runs (a few dozen examples per property, no deadline, since
onnxruntime session creation time varies). ``long``: the thorough run,
``pytest --hypothesis-profile=long``.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings

settings.register_profile(
    "default",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile(
    "long",
    parent=settings.get_profile("default"),
    max_examples=10_000,
)
settings.load_profile("default")
