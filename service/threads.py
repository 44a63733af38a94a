"""Heavy torch work on a thread that ends with it.

libgomp keeps a pool of OpenMP threads for every thread that has run a parallel torch op, for
as long as that thread lives, and once a process holds more OpenMP threads than CPUs, every pool
spins 100 times between parallel regions instead of 300,000 before it sleeps (libgomp manual,
``GOMP_SPINCOUNT``), so each region pays a wake-up. A model worker that had loaded the model or
applied an edit on its own long-lived thread would slow decoding on the generation thread for
as long as the process lives. A thread that ends takes its pool with it: heavy work off the
generation thread goes through :func:`on_own_thread`, and decoding is slowed only while that
work actually runs. The same holds the other way: each generation batch decodes on a thread of
its own, so an idle generator holds no pool to slow an edit beside it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def on_own_thread(work: Callable[..., T], *args: Any) -> T:
    """``work(*args)`` run on a short-lived thread of its own; its result is returned and its
    exception, if any, raised here."""
    result: list[T] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            result.append(work(*args))
        except BaseException as exc:  # handed to the waiting thread
            failure.append(exc)

    thread = threading.Thread(target=run, name="torch-work", daemon=True)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]
