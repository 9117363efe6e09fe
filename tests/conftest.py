"""Test setup: 8 fake CPU devices (for sharding tests), repo root importable, the shared fixtures.

Helpers the test modules share live in tests/tiny.py (importable by subprocess scripts too) and
the fixtures here; test modules do not import each other."""

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import pytest  # noqa: E402  (after the environment above: it must be set before JAX loads)
from tiny import make_tiny_model  # noqa: E402


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A tiny random Qwen2 model folder (tests/tiny.py), built once per test module."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny"))
