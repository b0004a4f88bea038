import pytest

# The shared checks in tests/helpers.py (loaded by test modules as a plugin) get pytest's assertion messages.
pytest.register_assert_rewrite("tests.helpers")
