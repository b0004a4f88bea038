import pytest

# The shared checks in tests/helpers.py and the hostile server in tests/hostile.py (loaded by test modules as
# plugins) get pytest's assertion messages.
pytest.register_assert_rewrite("tests.helpers", "tests.hostile")
