"""Shared fixtures: real-data paths (skipped with a reason when absent) and temp roots."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

# Idle OpenMP threads sleep at once in the tests (the package's default is a short spin,
# fsmis_bench/__init__.py): two pytest workers share the two cores of the CI machine. Set
# before any test module imports torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _shared(name: str, env: str) -> Path | None:
    value = os.environ.get(env)
    candidates = [Path(value)] if value else []
    candidates.append(REPO.parent / "shared" / name)
    for path in candidates:
        if path.is_dir():
            return path
    return None


@pytest.fixture(scope="session")
def real_data_root() -> Path:
    """The real CHAOS/CMR root (``FSMIS_DATA_ROOT``); skips the test when absent."""
    root = _shared("data", "FSMIS_DATA_ROOT")
    if root is None or not (root / "CHAOST2").is_dir():
        pytest.skip("real data not found: set FSMIS_DATA_ROOT to the folder holding CHAOST2/ and CMR/")
    return root


@pytest.fixture(scope="session")
def real_weights_root() -> Path:
    """The real TAESD weights root (``FSMIS_WEIGHTS_ROOT``); skips the test when absent."""
    root = _shared("weights", "FSMIS_WEIGHTS_ROOT")
    if root is None or not (root / "taesd").is_dir():
        pytest.skip("real weights not found: set FSMIS_WEIGHTS_ROOT to the folder holding taesd/")
    return root


@pytest.fixture(autouse=True, scope="session")
def _digest_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """File digests (run identities) are cached in a session folder, not the user's home."""
    os.environ["FSMIS_CACHE_DIR"] = str(tmp_path_factory.mktemp("digest_cache"))


@pytest.fixture(autouse=True)
def _root_logging_restored() -> Iterator[None]:
    """A sweep (`run -m`) lets Hydra put stream and file handlers on the root logger, bound
    to what the test captured; left there, they would write to closed streams in later tests
    ("--- Logging error ---" on stderr). pytest's own capture handlers are left alone."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in [h for h in root.handlers if h not in handlers]:
        if type(handler) in (logging.StreamHandler, logging.FileHandler):
            root.removeHandler(handler)
    root.setLevel(level)


@pytest.fixture()
def results_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh results root, also exported as FSMIS_RESULTS_DIR."""
    out = tmp_path / "results"
    monkeypatch.setenv("FSMIS_RESULTS_DIR", str(out))
    return out


def pytest_configure(config: pytest.Config) -> None:
    # Two xdist workers on two cores: one torch thread each avoids oversubscription.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _hydra_left_as_found():
    """A test that leaves Hydra's global state initialised breaks every later sweep in its
    process (``GlobalHydra is already initialized``): name it, not the sweep."""
    yield
    from hydra.core.global_hydra import GlobalHydra

    assert not GlobalHydra.instance().is_initialized(), "this test left Hydra's global state initialised"
