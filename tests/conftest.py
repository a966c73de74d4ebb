"""Shared pytest setup. Fixture modules live in tests/fixtures/ and are registered here; the
packages they stand on (kubetune_contract, _operator, _trainer, kubetune_dev) come from the
install (`make setup`) or PYTHONPATH."""

pytest_plugins = [
    "tests.fixtures.minio",
    "tests.fixtures.control_plane",
    "tests.fixtures.prometheus",
    "tests.fixtures.tiny_model",
]
