"""The metrics tests run real workers the way the executor tests do."""

from tests.executor.conftest import start_worker  # noqa: F401 - the fixture, shared
