import os
import sys

import pytest
import torch
from hydra.core.config_store import ConfigStore

from stabletrain.data.sources import SOURCES
from stabletrain.models import ATTENTIONS, DEPTH_SCALINGS, FEED_FORWARDS, RESIDUAL_STREAMS, ROUTERS, SIGNALS

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.pop("WANDB_API_KEY", None)
if not torch.cuda.is_available():
    # kernel=triton runs under the Triton interpreter on a CPU; set for the whole session, before any kernel is
    # decorated (test_mhc_triton.py's own setting would come too late on a worker that trained one already).
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_flush_denormal(True)
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Parallel workers share the cores: one thread each, as the subprocess runs get (OMP_NUM_THREADS=1).
    torch.set_num_threads(1)


@pytest.hookimpl(tryfirst=True)  # before xdist reads the xdist_group marks
def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
    # Under `make test` (-n 2 --dist loadgroup): the tests of a module with a module-scoped fixture (a set of
    # training runs, a torchrun launch) go to one worker, so the fixture is built once, not once per worker; they and
    # the slow tests are handed out first, so that the end is not one worker finishing a long test alone.
    for item in items:
        if _shares_a_module_fixture(item):
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))
    items.sort(key=lambda item: 0 if item.get_closest_marker("xdist_group") else 1 if "slow" in item.keywords else 2)


def _shares_a_module_fixture(item) -> bool:
    defs = getattr(item, "_fixtureinfo", None)  # pytest's own record of the fixtures a test uses
    return defs is not None and any(
        d.scope == "module" for name in item.fixturenames for d in defs.name2fixturedefs.get(name, ())
    )


@pytest.fixture(autouse=True)
def _plugins_unregistered_afterwards():
    """A test that loads a plugin component (STABLETRAIN_PLUGINS=tests.toy_residual, in this process) registers it
    in a registry and in Hydra's ConfigStore: undo that afterwards, so that later tests on the worker see only the
    project's own components (the configuration reference, the one-line errors that list the options)."""
    registries = (RESIDUAL_STREAMS, FEED_FORWARDS, ROUTERS, ATTENTIONS, DEPTH_SCALINGS, SIGNALS, SOURCES)
    before = {r: set(r._entries) for r in registries}
    yield
    for r, names in before.items():
        for name in set(r._entries) - names:
            del r._entries[name]
            group = ConfigStore.instance().repo
            for part in r.group.split("/"):
                group = group[part]
            group.pop(f"{name}.yaml", None)
            for plugin in ("tests.toy_residual", "tests.toy_attention", "tests.toy_source"):
                sys.modules.pop(plugin, None)
