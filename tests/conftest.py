"""Shared test settings: deterministic, CPU-friendly, and strict about torch.compile."""

import os

import pytest
import torch
import torch._dynamo
from hypothesis import HealthCheck, settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# A policy that blows dynamo's recompile limit must fail loudly, not fall back to eager.
torch._dynamo.config.fail_on_recompile_limit_hit = True

settings.register_profile(
    "default", deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.register_profile("thorough", deadline=None, max_examples=500, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
