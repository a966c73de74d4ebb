"""Shared pytest setup. Fixture modules live in tests/fixtures/ and are registered here."""
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for sub in ("operator", "trainer"):  # importable without an install too
    if str(REPO / sub) not in sys.path:
        sys.path.insert(0, str(REPO / sub))

pytest_plugins = [
    "tests.fixtures.minio",
    "tests.fixtures.control_plane",
    "tests.fixtures.tiny_model",
]
