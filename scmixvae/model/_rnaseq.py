"""scvi-tools' RNA-seq read-outs (differential expression) on the coupled mixture VAE."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from numbers import Number
from typing import Literal

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from scvi import REGISTRY_KEYS
from scvi.model.base import RNASeqMixin

from .._constants import NORMALISATION_SCALE, RAW_SCALING_KEY
from ..module._module import eval_mode

logger = logging.getLogger(__name__)


class CplMixVAERNAMixin(RNASeqMixin):
    """:class:`~scvi.model.base.RNASeqMixin` with a decoded expression that follows the consensus type.

    :meth:`differential_expression` (``groupby=``, ``group1=``, ``idx1=``, ``mode="change"``, ...) comes
    unchanged from scvi-tools; it samples :meth:`get_normalized_expression` for the cells of each group.
    """

    def differential_expression(self, adata: AnnData | None = None, *args, **kwargs) -> pd.DataFrame:
        """Differential expression: :meth:`scvi.model.base.RNASeqMixin.differential_expression`, same arguments.

        scvi-tools caches every cell's library-size scaling in ``adata.obs["_scvi_raw_norm_scaling"]`` while
        it runs; here that column is removed again (unless it was there before), so ``adata.obs`` is left as
        it was.

        Parameters
        ----------
        adata
            AnnData with the model's genes; defaults to the training data.
        *args, **kwargs
            Further arguments of scvi-tools' ``differential_expression`` (``groupby``, ``group1``, ``idx1``,
            ``mode``...).

        Returns
        -------
        scvi-tools' table of differential expression statistics, one row per gene (and comparison).
        """
        target = self.adata if adata is None else adata
        cached = not isinstance(target, AnnData) or RAW_SCALING_KEY in target.obs
        try:
            return super().differential_expression(adata, *args, **kwargs)
        finally:
            if not cached and RAW_SCALING_KEY in target.obs:
                del target.obs[RAW_SCALING_KEY]

    def _transform_batch_codes(self, adata: AnnData, transform_batch) -> list[int | None]:
        """Codes of the batches to decode in; ``[None]`` keeps each cell's observed batch."""
        if transform_batch is None:
            return [None]
        requested = [transform_batch] if isinstance(transform_batch, str | Number) else list(transform_batch)
        manager = self.get_anndata_manager(adata, required=True)
        mapping = manager.get_state_registry(REGISTRY_KEYS.BATCH_KEY).categorical_mapping.tolist()
        codes = []
        for batch in requested:
            if batch is None:
                codes.append(None)
            elif batch in mapping:
                codes.append(mapping.index(batch))
            else:
                raise ValueError(f"transform_batch={batch!r} is not a batch of the model; batches: {mapping}.")
        return codes

    @torch.inference_mode()
    def get_normalized_expression(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        transform_batch: Sequence[Number | str] | Number | str | None = None,
        gene_list: Sequence[str] | None = None,
        library_size: float | Literal["latent"] = 1,
        n_samples: int = 1,
        n_samples_overall: int | None = None,
        weights: Literal["uniform"] | None = None,
        batch_size: int | None = None,
        return_mean: bool = True,
        return_numpy: bool | None = None,
        silent: bool = True,
        *,
        agent: int | None = None,
        **kwargs,
    ) -> np.ndarray | pd.DataFrame:
        """Return the decoded normalised expression of each cell, conditioned on its consensus type.

        Each agent's state posterior is conditioned on the cell's consensus category (the argmax of
        the agents' mean categorical posterior) and decoded with that category: the mean for
        ``n_samples=1``, posterior samples otherwise (and for ``n_samples_overall``, which is what
        :meth:`differential_expression` uses). The expression frequencies of the count likelihoods
        are ``softmax`` over genes; for the Gaussian likelihood the decoded ``log1p`` expression is
        mapped back to frequencies as ``expm1(mean) / 1e4`` (clipped at 0) so that log fold changes are
        defined.

        Parameters
        ----------
        adata
            AnnData with the model's genes; defaults to the training data.
        indices
            Cells to use; all by default.
        transform_batch
            Batch(es) to decode in (names as in the batch key); several are averaged; ``None`` uses
            each cell's own batch.
        gene_list
            Return only these genes.
        library_size
            Scale of the frequencies (``1``: they sum to about 1), or ``"latent"``: the observed library
            size of each cell (the model's offset).
        n_samples
            Posterior samples per cell; ``1`` decodes the posterior mean.
        n_samples_overall
            Total number of samples drawn from the cells together (rows of the output); overrides
            ``n_samples``.
        weights
            Only ``"uniform"`` (or ``None``); importance weights are not available for this model.
        batch_size
            Minibatch size.
        return_mean
            Average the ``n_samples`` samples of each cell.
        return_numpy
            Return an array instead of a DataFrame (default for ``n_samples_overall`` and for samples
            that are not averaged).
        silent
            Unused; kept for scvi-tools' signature.
        agent
            Decode with one agent; ``None`` averages the agents' expression.
        **kwargs
            scvi-tools' importance-weighting arguments are not supported (:class:`ValueError`); a
            ``dataloader=None`` or ``data_loader_kwargs`` is accepted.

        Returns
        -------
        ``(n_cells, n_genes)`` as a DataFrame indexed by ``obs_names`` (or an array), ``(n_samples, n_cells,
        n_genes)`` for unaveraged samples, or ``(n_samples_overall, n_genes)``.
        """
        data_loader_kwargs = kwargs.pop("data_loader_kwargs", None) or {}
        if kwargs.pop("dataloader", None) is not None:
            raise ValueError("A custom `dataloader` is not supported; pass `adata` and `indices`.")
        if kwargs:
            raise ValueError(f"Unsupported arguments for CplMixVAE.get_normalized_expression: {sorted(kwargs)}.")
        if weights not in (None, "uniform"):
            raise ValueError(f'Only weights="uniform" is available for CplMixVAE, got {weights!r}.')
        if library_size != "latent" and (isinstance(library_size, bool) or not isinstance(library_size, Number)):
            raise ValueError(f'`library_size` must be a number or "latent", got {library_size!r}.')
        if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
            raise ValueError(f"`n_samples` must be a positive integer, got {n_samples!r}.")
        if agent is not None and not (isinstance(agent, int) and 0 <= agent < self.module.n_agents):
            raise ValueError(f"`agent` must be None or an integer in 0..{self.module.n_agents - 1}, got {agent!r}.")
        self._check_if_trained(warn=True)
        adata = self._validate_anndata(adata)
        indices = np.arange(adata.n_obs) if indices is None else np.asarray(indices)
        sample = n_samples > 1 or n_samples_overall is not None
        if n_samples_overall is not None:
            n_samples = n_samples_overall // max(len(indices), 1) + 1
        batch_codes = self._transform_batch_codes(adata, transform_batch)
        gene_mask = np.ones(adata.n_vars, dtype=bool) if gene_list is None else adata.var_names.isin(gene_list)

        module = self.module
        dl = self._make_data_loader(adata=adata, indices=indices, batch_size=batch_size, **data_loader_kwargs)
        exprs = []
        with eval_mode(module):
            for tensors in dl:
                inputs = module._get_inference_input(tensors)
                out = module.inference(**inputs)
                c, mean, var = module.consensus_state(out["q"], out["hs"])
                per_sample = []
                for _ in range(n_samples):
                    s = mean + var.sqrt() * torch.randn_like(mean) if sample else mean
                    per_sample.append(self._decode_scale(out, inputs, s, c, batch_codes, agent, library_size))
                exprs.append(torch.stack(per_sample).cpu().numpy()[..., gene_mask])
        exprs = np.concatenate(exprs, axis=1)  # (n_samples, n_cells, n_genes)

        if n_samples_overall is not None:
            flat = exprs.reshape(-1, exprs.shape[-1])
            # numpy's global generator, seeded by scvi.settings.seed, as scvi-tools' own implementation
            return flat[np.random.choice(flat.shape[0], n_samples_overall, replace=True)]  # noqa: NPY002
        if n_samples > 1 and not return_mean:
            return exprs
        exprs = exprs.mean(0)
        if return_numpy:
            return exprs
        return pd.DataFrame(exprs, index=adata.obs_names[indices], columns=adata.var_names[gene_mask])

    def _decode_scale(self, out, inputs, s, c, batch_codes, agent, library_size) -> torch.Tensor:
        """Expression frequencies ``(B, D)`` of states ``s`` ``(A, B, S)``, averaged over ``batch_codes``."""
        module = self.module
        batch_index = inputs.get("batch_index")
        scales = []
        for code in batch_codes:
            if code is None:
                cov, b_index = out["cov"], batch_index
            else:
                b_index = torch.full((s.shape[1], 1), code, dtype=torch.long, device=s.device)
                cov = module._covariates(b_index, inputs.get("cat_covs"), inputs.get("cont_covs"))
            gen = module.generative(s, c, out["library"], b_index, cov)
            if module.likelihood == "gaussian":
                scale = torch.expm1(gen["px_mean"]).clamp(min=0.0) / NORMALISATION_SCALE
            else:
                scale = module.log_scale(gen).exp()
            scales.append(scale.mean(0) if agent is None else scale[agent])
        scale = torch.stack(scales).mean(0)
        return scale * (out["library"] if library_size == "latent" else library_size)
