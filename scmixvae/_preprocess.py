"""Log-normalised counts of a block of cells on the CPU: the module's ``normalise``, for the start and ``tl``."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from ._constants import NORMALISATION_SCALE


def log_normalise_block(block, *, dtype=np.float32):
    """``log1p`` of library-normalised counts of a block of cells (``1e4`` counts per cell).

    A sparse block comes back as CSR, anything else as a dense array; cells without counts stay zero.
    """
    if sp.issparse(block):
        block = sp.csr_matrix(block, dtype=dtype)
        library = np.asarray(block.sum(1)).ravel()
        block = sp.diags((NORMALISATION_SCALE / np.maximum(library, 1.0)).astype(dtype)) @ block
        block.data = np.log1p(block.data)
        return block.tocsr()
    block = np.asarray(block, dtype=dtype)
    library = block.sum(1, keepdims=True)
    return np.log1p(block * (NORMALISATION_SCALE / np.maximum(library, 1.0)))
