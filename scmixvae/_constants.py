"""Every AnnData key and registry name used by scmixvae, in one place."""

from __future__ import annotations

#: Default ``key_added`` of the ``tl`` verbs; results land in ``obs[f"{key}_type"]`` etc.
DEFAULT_KEY = "cplmixvae"
#: Default ``key_added`` of :func:`scmixvae.tl.rank_state_genes`.
DEFAULT_STATE_GENES_KEY = "cplmixvae_state_genes"

#: Scale factor used to library-normalise counts before ``log1p`` (encoder input, Gaussian target).
NORMALISATION_SCALE = 1e4

#: Environment variable that points the dataset loaders at a local folder of ``.h5ad`` files.
DATA_DIR_ENV = "SCMIXVAE_DATA_DIR"


def type_key(key: str) -> str:
    """``obs`` column of the consensus type."""
    return f"{key}_type"


def confidence_key(key: str) -> str:
    """``obs`` column of the consensus confidence."""
    return f"{key}_confidence"


def agreement_key(key: str) -> str:
    """``obs`` column: whether all agents agree with the consensus."""
    return f"{key}_agree"


def agent_type_key(key: str, agent: int) -> str:
    """``obs`` column of one agent's type."""
    return f"{key}_agent{agent}_type"


def state_key(key: str) -> str:
    """``obsm`` key of the state latent."""
    return f"X_{key}_state"


def category_name(k: int) -> str:
    """Name of category ``k`` as written to AnnData (strings, so that the columns are categorical)."""
    return str(k)


#: Key of the minibatch tensor holding one nearest neighbour's counts per cell (``augmentation="knn"``).
NEIGHBOUR_X_KEY = "x_neighbour"

#: Registry key of the experimental condition (``setup_anndata(condition_key=...)``), whose effect the state carries.
CONDITION_KEY = "condition"

#: ``obs`` columns that scvi-tools' registration (``setup_anndata``) adds: the codes it reads the batch, the labels
#: and the condition from (``_scvi_batch`` and ``_scvi_labels`` always; ``_scvi_condition`` with a condition).
REGISTERED_OBS_COLUMNS = ("_scvi_batch", "_scvi_labels", "_scvi_condition")
#: ``obs`` column scvi-tools' differential expression caches library-size scalings in (removed afterwards).
RAW_SCALING_KEY = "_scvi_raw_norm_scaling"
