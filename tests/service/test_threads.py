"""Heavy work off the generation thread runs on a short-lived thread (``on_own_thread``), so
that the OpenMP pool it creates goes away with it instead of slowing decoding for good."""

from __future__ import annotations

import threading

import pytest
import torch
from svc_helpers import os_threads, settled_threads, steady_threads

from service.threads import on_own_thread


def _parallel_op() -> None:
    """An op large enough that torch runs it as an OpenMP parallel region."""
    torch.ones(4096, 4096).mul_(2.0)


def test_work_runs_on_another_thread_and_its_exception_reaches_the_caller() -> None:
    seen: list[int] = []
    on_own_thread(lambda out: out.append(threading.get_ident()), seen)
    assert seen and seen[0] != threading.get_ident()

    def fail() -> None:
        raise KeyError("from the work thread")

    with pytest.raises(KeyError, match="from the work thread"):
        on_own_thread(fail)


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="needs torch with 2+ intra-op threads")
def test_the_openmp_pool_of_the_work_leaves_with_it() -> None:
    before = steady_threads()
    # The mechanism: a thread that lives on after a parallel op keeps a pool of OpenMP threads.
    done, release = threading.Event(), threading.Event()

    def long_lived() -> None:
        _parallel_op()
        done.set()
        release.wait()

    keeper = threading.Thread(target=long_lived)
    keeper.start()
    done.wait()
    assert os_threads() > before + 1, "a parallel op left no pool behind: nothing to test"
    release.set()
    keeper.join()
    baseline = settled_threads(before)

    on_own_thread(_parallel_op)

    assert settled_threads(baseline) == baseline, "the work's OpenMP pool outlived it"
