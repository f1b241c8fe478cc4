import os
import tempfile

import pytest

from synth import CIFAKE_TAR, LITE0_WEIGHTS, PHOTOS_TAR, extract_cifake

# every test run gets its own cache directory (index and feature caches), never the user's
os.environ.setdefault("FAKESCOPE_CACHE_DIR", tempfile.mkdtemp(prefix="fakescope-test-cache-"))
os.environ.setdefault("FAKESCOPE_PROGRESS", "0")


def _need(path):
    if not path.exists():
        pytest.skip(f"{path} is absent (../shared holds the real test data; a fresh clone does not)")


@pytest.fixture(scope="session")
def cifake_small(tmp_path_factory):
    """300 + 300 real CIFAKE train images and 150 + 150 val images."""
    _need(CIFAKE_TAR)
    return extract_cifake(tmp_path_factory.mktemp("cifake"), 300, 150)


@pytest.fixture(scope="session")
def lite0_weights():
    _need(LITE0_WEIGHTS)
    return LITE0_WEIGHTS


@pytest.fixture(scope="session")
def photos_tar():
    _need(PHOTOS_TAR)
    return PHOTOS_TAR
