"""Fixtures shared by several test modules."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_torch_thread():
    """Models this small run fastest on one thread, and do not suffer from a busy machine.
    Use with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def quick_tiny_runs(one_torch_thread):
    """Short training runs of tiny models: one intra-op thread (on a shared 2-core machine two
    threads contending with other processes made them ~10x slower), and no MFU denominator (a
    1024^3 matmul benchmark at every run start) for modules whose tests never read MFU.
    Use with `pytestmark = pytest.mark.usefixtures("quick_tiny_runs")`."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("behemoth.train.loop.machine_matmul_peak", lambda *_: 1e12)
        yield


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """Commands run in-process (`behemoth serve`, `behemoth chat`) keep their main thread to one
    torch thread; restore the count so that later tests compute as they would alone."""
    before = torch.get_num_threads()
    yield
    if torch.get_num_threads() != before:
        torch.set_num_threads(before)
