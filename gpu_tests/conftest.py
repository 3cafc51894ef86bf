# The tests' settings (offline, a temporary cache) and their tiny checkpoint fixture.
from tests.conftest import tiny_repo  # noqa: F401
