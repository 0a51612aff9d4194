"""Session-wide test settings: profiles are cached in a fresh folder, never in the user's home; torch uses
one intra-op thread."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _profile_cache(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("AUTOFIT_CACHE", str(tmp_path_factory.mktemp("profile-cache")))
    yield
    mp.undo()


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """The tiny models' ops are microseconds of work: one intra-op thread avoids OpenMP spin-waiting,
    which made the tests several times slower on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
