"""The hostile-file corpus checks its refused cases in hostile_files.check_refused: pytest rewrites the asserts
of that module too, so that a failure shows the values compared."""

import pytest

pytest.register_assert_rewrite("hostile_files")
