"""Keep the user's thread settings across calls into scanpy, numba and scikit-learn.

numba's OpenMP threading layer, started by scanpy's neighbour search, resets the OpenMP runtime that torch
shares: after ``sc.pp.neighbors`` torch runs at every core even where the user asked for one thread
(``OMP_NUM_THREADS=1`` or :func:`torch.set_num_threads`), and two fits on one machine then slow each other down
many times over. Every step of the package that calls such a library runs inside :func:`keep_thread_settings`.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch


def _numba_threads() -> int | None:
    """Numba's thread count, or ``None`` while its threading layer has not started (asking would start it)."""
    parallel = sys.modules.get("numba.np.ufunc.parallel")
    if parallel is None or not getattr(parallel, "_is_initialized", False):
        return None
    return parallel.get_num_threads()


@contextmanager
def keep_thread_settings() -> Iterator[None]:
    """Restore torch's (and numba's) thread counts on exit to what they were on entry.

    Examples
    --------
    >>> import torch
    >>> from scmixvae._threads import keep_thread_settings
    >>> before = torch.get_num_threads()
    >>> with keep_thread_settings():
    ...     torch.set_num_threads(1)
    >>> torch.get_num_threads() == before
    True
    """
    torch_threads = torch.get_num_threads()
    numba_threads = _numba_threads()
    try:
        yield
    finally:
        if numba_threads is not None:
            sys.modules["numba.np.ufunc.parallel"].set_num_threads(numba_threads)
        # last: starting numba's layer, or setting its count, can reset the OpenMP runtime that torch reads
        if torch.get_num_threads() != torch_threads:
            torch.set_num_threads(torch_threads)
