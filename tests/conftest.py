"""Session-wide test settings: profiles are cached in a fresh folder, never in the user's home."""

import pytest


@pytest.fixture(autouse=True, scope="session")
def _profile_cache(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("AUTOFIT_CACHE", str(tmp_path_factory.mktemp("profile-cache")))
    yield
    mp.undo()
