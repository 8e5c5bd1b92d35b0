"""Shared pytest setup. Each engineer's fixtures live in their own test files or in clearly named blocks here."""

from __future__ import annotations

import os

# Tests never reach the real Hugging Face Hub or use the user's cache/token.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# --- Hugging Face Hub tests (issue 4: merge/hub.py, tests/hubserver.py) --------------------------------
# Set before huggingface_hub is imported (it reads these on import): a throwaway HF_HOME so no test reads
# the user's token or cache, no token from the environment, and an endpoint nobody listens on, so a test
# that forgets the local server fails instead of reaching the real Hub.
import atexit
import shutil
import tempfile

import pytest

_HF_HOME = tempfile.mkdtemp(prefix="papa-merge-test-hf-home-")
atexit.register(shutil.rmtree, _HF_HOME, True)
os.environ["HF_HOME"] = _HF_HOME
for _var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE",
             "HF_XET_CACHE", "HF_ASSETS_CACHE", "HF_STORED_TOKENS_PATH"):
    os.environ.pop(_var, None)
os.environ["HF_ENDPOINT"] = "http://127.0.0.1:9"  # the discard port: nothing answers


@pytest.fixture(scope="session")
def hub_server(tmp_path_factory):
    """A local Hub-compatible server (tests/hubserver.py) on 127.0.0.1, started once, stopped at the end."""
    from tests.hubserver import HubServer

    server = HubServer(tmp_path_factory.mktemp("hubserver")).start()
    yield server
    server.stop()


@pytest.fixture()
def hub(hub_server, monkeypatch, tmp_path):
    """The local Hub as the endpoint, online, with a fresh download cache and LFS uploads (XET off) per test."""
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_ENDPOINT", hub_server.url)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    hub_server.upload_mode = "lfs"
    yield hub_server
    hub_server.upload_mode = "lfs"
# --- end of Hugging Face Hub tests block ---------------------------------------------------------------


# --- Test tiers (issue 23 item 4): `slow` is left out of `make test-fast`, `full` out of `make test` ------------
# The markers are declared in pyproject.toml. A `full` test runs the product at its default size (the whole
# default quickstart: minutes on a quiet machine, up to an hour on a loaded one): `make test-quickstart`.
def pytest_addoption(parser):
    parser.addoption("--run-full", action="store_true", default=False,
                     help="also run the tests marked full (the product at its default size; make test-quickstart)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-full"):
        return
    skip = pytest.mark.skip(reason="runs the product at its default size: make test-quickstart (pytest --run-full)")
    for item in items:
        if item.get_closest_marker("full") is not None:
            item.add_marker(skip)
# --- end of test tiers block ---------------------------------------------------------------------------------
