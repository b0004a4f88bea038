import pytest

# The shared checks in tests/helpers.py, the hostile server in tests/hostile.py and the S3 server in
# tests/s3_server.py (loaded by test modules as plugins) get pytest's assertion messages.
pytest.register_assert_rewrite("tests.helpers", "tests.hostile", "tests.s3_server")
