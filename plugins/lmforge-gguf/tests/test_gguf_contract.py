"""lmforge-gguf against lmforge's exporter protocol (lmforge.testing, what `lmforge plugins check lmforge-gguf`
runs): a tiny checkpoint written as `lmforge fit` writes one, exported through lmforge.export.export into a new
folder that holds the file, with nothing left beside it."""

import pytest

from lmforge.testing import assert_plugin_ok


@pytest.mark.parametrize("dtype", ["f16", "q8_0"])
def test_follows_the_lmforge_exporter_protocol(dtype):
    assert_plugin_ok("exporter", "gguf", dtype=dtype)
