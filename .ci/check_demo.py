"""Check that ``scmixvae demo`` wrote what the README promises, and that each file opens.

``python .ci/check_demo.py FOLDER``: ``demo.h5ad`` (types in ``obs``, states in ``obsm``), ``demo.png`` (an image)
and ``model/`` (a saved model that loads onto the written data and predicts its types).
"""

import sys
from pathlib import Path

import anndata
import matplotlib.image
import numpy as np

from scmixvae.model import CplMixVAE


def main(folder: Path) -> None:
    """Open each output of the demo and check its content."""
    adata = anndata.read_h5ad(folder / "demo.h5ad")
    types = adata.obs["cplmixvae_type"]
    states = adata.obsm["X_cplmixvae_state"]
    if types.isna().any() or not np.isfinite(states).all():
        raise SystemExit("demo.h5ad: missing types or non-finite states")
    image = matplotlib.image.imread(folder / "demo.png")
    if image.ndim != 3 or min(image.shape[:2]) < 100:
        raise SystemExit(f"demo.png: not a figure (shape {image.shape})")
    model = CplMixVAE.load(folder / "model", adata=adata)
    agreement = np.mean(model.predict(adata).astype(str) == types.astype(str).to_numpy())
    if agreement < 0.99:
        raise SystemExit(f"model/: the saved model predicts {agreement:.1%} of the written types")
    print(f"demo outputs open: {adata.n_obs} cells, {types.nunique()} types, image {image.shape}, model reloads")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
