"""scvi-tools' RNA-seq read-outs (differential expression) on the coupled mixture VAE."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from numbers import Number
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from scipy.stats import spearmanr
from scvi import REGISTRY_KEYS
from scvi.model.base import RNASeqMixin

from .. import _validation as check
from .._constants import NORMALISATION_SCALE, RAW_SCALING_KEY

if TYPE_CHECKING:
    import sparse

logger = logging.getLogger(__name__)


def _check_groups(adata: AnnData, groupby: str | None = None, group1=None, group2=None) -> None:
    """Refuse a ``groupby`` that is not a column of ``adata.obs``, or ``group1``/``group2`` values it lacks."""
    if groupby is None:
        return
    check.check_obs_keys(adata, groupby=groupby)
    present = set(adata.obs[groupby].astype(str))
    for name, groups in (("group1", group1), ("group2", group2)):
        if groups is None:
            continue
        missing = [g for g in check.as_list(groups) if str(g) not in present]
        if missing:
            raise ValueError(
                f"`{name}`: {missing} not among the values of adata.obs[{groupby!r}] (e.g. {sorted(present)[:10]})."
            )


class CplMixVAERNAMixin(RNASeqMixin):
    """:class:`~scvi.model.base.RNASeqMixin` with a decoded expression that follows the consensus type.

    :meth:`differential_expression` (``groupby=``, ``group1=``, ``idx1=``, ``mode="change"``, ...) comes
    unchanged from scvi-tools; it samples :meth:`get_normalized_expression` for the cells of each group. The other
    read-outs of scvi-tools' mixin decode each cell with its consensus category, as
    :meth:`get_normalized_expression` does, from one agent (``agent``, default agent 0 for samples) or the mean of
    the agents.
    """

    def differential_expression(self, adata: AnnData | None = None, *args, **kwargs) -> pd.DataFrame:
        """Differential expression: :meth:`scvi.model.base.RNASeqMixin.differential_expression`, same arguments.

        scvi-tools caches every cell's library-size scaling in ``adata.obs["_scvi_raw_norm_scaling"]`` while
        it runs; here that column is removed again (unless it was there before), so ``adata.obs`` is left as
        it was. On a backed AnnData, scvi-tools' raw-count statistics (``all_stats=True``, its default) cannot be
        computed: pass ``all_stats=False`` or load the data into memory (``adata.to_memory()``).

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
        given = inspect.signature(RNASeqMixin.differential_expression).bind_partial(self, adata, *args, **kwargs)
        arguments = given.arguments
        if arguments.get("groupby") is None and arguments.get("idx1") is None:  # scvi-tools: "KeyError: None"
            raise ValueError(
                "differential_expression needs the cells to compare: `groupby` (an obs column; `group1` picks its "
                "groups) or `idx1` (and `idx2`)."
            )
        if isinstance(target, AnnData):
            _check_groups(target, arguments.get("groupby"), arguments.get("group1"), arguments.get("group2"))
            if target.isbacked and arguments.get("all_stats", True):
                raise ValueError(
                    "scvi-tools' raw-count statistics (all_stats=True) need the counts in memory; this AnnData is "
                    "backed. Pass all_stats=False, or load it first with `adata.to_memory()`."
                )
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
            Cells to use, as integer positions or a boolean mask; all by default.
        transform_batch
            Batch(es) to decode in (names as in the batch key); several are averaged; ``None`` uses
            each cell's own batch.
        gene_list
            Return only these genes.
        library_size
            Scale of the frequencies (``1``: they sum to 1 for the count likelihoods), or ``"latent"``: the
            observed library size of each cell (the model's offset). With the Gaussian likelihood the
            frequencies are not normalised: ``expm1`` of the mean of ``log1p`` values lies below the mean
            expression, so their sums vary between cells (about 0.4 to 1.7 on simulated data, median 0.8).
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
        check.check_int("n_samples", n_samples, minimum=1)
        self._check_agent(agent)
        if n_samples_overall is not None:
            check.check_int("n_samples_overall", n_samples_overall, minimum=1)
        if library_size != "latent" and not (np.isfinite(library_size) and library_size > 0):
            raise ValueError(f'`library_size` must be a positive number or "latent", got {library_size!r}.')
        adata, indices = self._read_out_cells(adata, indices)
        gene_mask = check.check_gene_list(gene_list, adata.var_names)
        sample = n_samples > 1 or n_samples_overall is not None
        if n_samples_overall is not None:
            n_samples = n_samples_overall // max(len(indices), 1) + 1
        batch_codes = self._transform_batch_codes(adata, transform_batch)

        picked = None
        if n_samples_overall is not None:  # rows `sample * n_cells + cell` of all the samples, drawn before decoding
            # numpy's global generator, seeded by scvi.settings.seed, as scvi-tools' own implementation
            picked = np.random.choice(n_samples * len(indices), n_samples_overall, replace=True)  # noqa: NPY002
        keep_samples = picked is None and n_samples > 1 and not return_mean
        exprs = self._decoded_expression(
            adata, indices, n_samples, sample, picked, keep_samples, gene_mask,
            decode={"batch_codes": batch_codes, "agent": agent, "library_size": library_size},
            read={"batch_size": batch_size, "data_loader_kwargs": data_loader_kwargs},
        )  # fmt: skip
        if picked is not None or keep_samples or return_numpy:
            return exprs
        return pd.DataFrame(exprs, index=adata.obs_names[indices], columns=adata.var_names[gene_mask])

    def _decoded_expression(
        self, adata, indices, n_samples, sample, picked, keep_samples, gene_mask, *, decode: dict, read: dict
    ) -> np.ndarray:
        """Decode the cells minibatch by minibatch into one array of the result's size, the ``gene_mask`` genes only.

        The result: the ``picked`` rows of the ``(n_samples * n_cells, n_genes)`` samples, all ``(n_samples, n_cells,
        n_genes)`` samples (``keep_samples``) or their mean ``(n_cells, n_genes)``. No array of every cell's samples
        of every gene is built (it grew to several times the result on large data).
        """
        genes = torch.as_tensor(np.flatnonzero(gene_mask))
        if picked is not None:
            picked_sample, picked_cell = np.divmod(picked, len(indices))
        result, start = None, 0
        for inputs, out in self._inference(adata, indices, **read):
            c, mean, var = self.module.consensus_state(out["q"], out["hs"])
            genes = genes.to(mean.device)
            draws = []
            for _ in range(n_samples):
                s = mean + var.sqrt() * torch.randn_like(mean) if sample else mean
                draws.append(self._decode_scale(out, inputs, s, c, **decode)[:, genes])
            draws = torch.stack(draws).cpu().numpy()  # (n_samples, B, n_genes)
            stop = start + draws.shape[1]
            if result is None:
                cells = (n_samples, len(indices)) if keep_samples else (len(indices),)
                rows = (len(picked),) if picked is not None else cells
                result = np.empty((*rows, len(genes)), dtype=draws.dtype)
            if picked is not None:
                rows = (picked_cell >= start) & (picked_cell < stop)
                result[rows] = draws[picked_sample[rows], picked_cell[rows] - start]
            elif keep_samples:
                result[:, start:stop] = draws
            else:
                result[start:stop] = draws.mean(0)
            start = stop
        return result

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
                cov = module.covariates(b_index, inputs.get("cat_covs"), inputs.get("cont_covs"))
            gen = module.generative(s, c, out["library"], b_index, cov)
            if module.likelihood == "gaussian":
                scale = torch.expm1(gen["px_mean"]).clamp(min=0.0) / NORMALISATION_SCALE
            else:
                scale = module.log_scale(gen).exp()
            scales.append(scale.mean(0) if agent is None else scale[agent])
        scale = torch.stack(scales).mean(0)
        return scale * (out["library"] if library_size == "latent" else library_size)

    def _consensus_decodes(self, adata, indices, batch_size, *, give_mean: bool, data_loader_kwargs=None):
        """Yield ``(inputs, inference outputs, generative outputs)`` decoded with the consensus category.

        ``adata`` and ``indices`` as checked by :meth:`_read_out_cells`.
        """
        module = self.module
        for inputs, out in self._inference(adata, indices, batch_size, data_loader_kwargs):
            c, mean, var = module.consensus_state(out["q"], out["hs"])
            s = mean if give_mean else mean + var.sqrt() * torch.randn_like(mean)
            yield inputs, out, module.generative(s, c, out["library"], inputs.get("batch_index"), out["cov"])

    @torch.inference_mode()
    def posterior_predictive_sample(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        transform_batch=None,
        n_samples: int = 1,
        gene_list: Sequence[str] | None = None,
        batch_size: int | None = None,
        dataloader=None,
        silent: bool = True,
        *,
        agent: int = 0,
        **data_loader_kwargs,
    ) -> sparse.GCXS:
        """Draw data from the posterior predictive of one agent, as scvi-tools' method.

        Each cell's state is sampled from its posterior given the consensus category and decoded by agent
        ``agent``; the data are sampled from its likelihood: counts for ``"nb"``/``"zinb"``, the log1p-normalised
        expression for ``"gaussian"``.

        Parameters
        ----------
        adata, indices, batch_size
            As in :meth:`get_normalized_expression`.
        transform_batch
            Not supported for sampling (``None``): the cells are sampled in their own batch.
        n_samples
            Samples per cell.
        gene_list
            Return only these genes.
        dataloader
            Not supported (``None``).
        silent
            Unused; kept for scvi-tools' signature.
        agent
            The agent whose generative model is sampled.
        **data_loader_kwargs
            Keyword arguments of the data loader.

        Returns
        -------
        A :class:`sparse.GCXS` array ``(n_cells, n_genes)``, or ``(n_cells, n_genes, n_samples)`` for
        ``n_samples > 1`` (``.todense()`` gives numpy).
        """
        if transform_batch is not None or dataloader is not None:
            raise ValueError(
                "CplMixVAE samples each cell in its own batch from `adata`: pass no `transform_batch`/`dataloader`."
            )
        check.check_int("n_samples", n_samples)
        check.check_int("agent", agent, minimum=0, maximum=self.module.n_agents - 1)
        adata, indices = self._read_out_cells(adata, indices)
        gene_mask = check.check_gene_list(gene_list, adata.var_names)
        samples = []
        for _ in range(n_samples):
            per_sample = []
            for _, _, gen in self._consensus_decodes(
                adata, indices, batch_size, give_mean=False, data_loader_kwargs=data_loader_kwargs
            ):
                per_sample.append(self.module.px_distribution(gen).sample()[agent].cpu().numpy()[:, gene_mask])
            samples.append(np.concatenate(per_sample))
        out = samples[0] if n_samples == 1 else np.stack(samples, axis=-1)
        import sparse  # scvi-tools' dependency, the type its posterior_predictive_sample returns

        return sparse.GCXS.from_numpy(out)

    @torch.inference_mode()
    def get_feature_correlation_matrix(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        n_samples: int = 10,
        batch_size: int = 64,
        rna_size_factor: int = 1000,
        transform_batch=None,
        correlation_type: Literal["spearman", "pearson"] = "spearman",
        silent: bool = True,
    ) -> pd.DataFrame:
        """Gene-gene correlation of the decoded expression over cells and posterior samples.

        The samples are those of :meth:`get_normalized_expression` (state posterior samples given the
        consensus category, the mean of the agents), scaled by ``rna_size_factor``; with several
        ``transform_batch`` the matrices of the batches are averaged, as in scvi-tools. Unlike scvi-tools no
        Gamma noise is added (the correlation of the decoded means).

        Returns
        -------
        ``(n_genes, n_genes)`` DataFrame indexed by gene names (NaN for genes that do not vary).
        """
        check.check_choice("correlation_type", correlation_type, ("spearman", "pearson"))
        check.check_int("n_samples", n_samples)
        adata = self._validate_anndata(adata)
        batches = transform_batch if isinstance(transform_batch, list | tuple) else [transform_batch]
        corr = []
        for batch in batches:
            exprs = self.get_normalized_expression(
                adata, indices, transform_batch=batch, library_size=rna_size_factor, n_samples=max(n_samples, 2),
                return_mean=False, batch_size=batch_size,
            )[:n_samples]  # fmt: skip
            flat = exprs.reshape(-1, exprs.shape[-1])
            with np.errstate(invalid="ignore", divide="ignore"):
                corr.append(np.corrcoef(flat, rowvar=False) if correlation_type == "pearson" else spearmanr(flat)[0])
        return pd.DataFrame(np.mean(corr, axis=0), index=adata.var_names, columns=adata.var_names)

    @torch.inference_mode()
    def get_likelihood_parameters(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        n_samples: int | None = 1,
        give_mean: bool | None = False,
        batch_size: int | None = None,
        dataloader=None,
        *,
        agent: int | None = None,
        **data_loader_kwargs,
    ) -> dict[str, np.ndarray]:
        """Parameters of the likelihood of each cell given its consensus category, as scvi-tools' method.

        Parameters
        ----------
        adata, indices, batch_size
            As in :meth:`get_normalized_expression`.
        n_samples
            State posterior samples per cell; ``1`` decodes the posterior mean.
        give_mean
            Average the samples (``n_samples > 1``).
        dataloader
            Not supported (``None``).
        agent
            One agent's decoder; ``None``: the mean of the agents' parameters.
        **data_loader_kwargs
            Keyword arguments of the data loader.

        Returns
        -------
        ``{"mean": ..., "dispersions": ..., "dropout": ...}``, each ``(n_cells, n_genes)`` or
        ``(n_samples, n_cells, n_genes)``: for ``"nb"``/``"zinb"`` the negative binomial mean (counts, with the
        observed library size), its inverse dispersion ``theta`` and (``"zinb"``) the zero-inflation probability;
        for ``"gaussian"`` only ``"mean"``, the decoded log1p-normalised expression (unit variance).
        """
        if dataloader is not None:
            raise ValueError("A custom `dataloader` is not supported; pass `adata` and `indices`.")
        check.check_int("n_samples", n_samples)
        self._check_agent(agent)
        adata, indices = self._read_out_cells(adata, indices)
        per_sample = []
        for _ in range(n_samples):
            params: dict[str, list[np.ndarray]] = {}
            decodes = self._consensus_decodes(
                adata, indices, batch_size, give_mean=n_samples == 1, data_loader_kwargs=data_loader_kwargs
            )
            for _, _, gen in decodes:
                for key, value in self._likelihood_parameters(gen).items():
                    value = value.expand(gen[next(iter(gen))].shape) if key == "dispersions" else value
                    params.setdefault(key, []).append((value.mean(0) if agent is None else value[agent]).cpu().numpy())
            per_sample.append({key: np.concatenate(value) for key, value in params.items()})
        if n_samples == 1:
            return per_sample[0]
        stacked = {key: np.stack([sample[key] for sample in per_sample]) for key in per_sample[0]}
        return {key: value.mean(0) for key, value in stacked.items()} if give_mean else stacked

    def _likelihood_parameters(self, gen: dict) -> dict[str, torch.Tensor]:
        module = self.module
        if module.likelihood == "gaussian":
            return {"mean": gen["px_mean"]}
        params = {"mean": module.log_rate(gen).exp(), "dispersions": gen["px_r"]}
        if module.likelihood == "zinb":
            params["dropout"] = torch.sigmoid(gen["px_dropout"])
        return params

    @torch.inference_mode()
    def get_latent_library_size(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        give_mean: bool = True,
        batch_size: int | None = None,
        dataloader=None,
        **data_loader_kwargs,
    ) -> np.ndarray:
        """Library size of each cell, ``(n_cells, 1)``.

        CplMixVAE has no latent library size: the likelihoods use the observed total counts, so the "posterior"
        is that value itself and ``give_mean`` changes nothing (scvi-tools' ``SCVI`` with its default
        ``use_observed_lib_size=True`` returns the same with ``give_mean=False``).
        """
        if dataloader is not None:
            raise ValueError("A custom `dataloader` is not supported; pass `adata` and `indices`.")
        self._check_if_trained(warn=False)
        adata = self._validate_anndata(adata)
        indices = check.check_indices(indices, adata.n_obs)
        minibatches = self._read_minibatches(adata, indices, batch_size, data_loader_kwargs)
        return np.concatenate([  # each minibatch's totals as it is read: the counts are not kept
            (x.to_dense() if x.layout != torch.strided else x).sum(-1, keepdim=True).numpy()
            for x in (tensors[REGISTRY_KEYS.X_KEY] for tensors in minibatches)
        ])  # fmt: skip

    def get_importance_weights(self, *args, **kwargs):
        """Not available: importance weights need a single posterior over one latent, which the mixture lacks.

        Raises :class:`NotImplementedError`; :meth:`differential_expression` uses ``weights="uniform"``.
        """
        raise NotImplementedError(
            "CplMixVAE has no importance weights (its posterior is a mixture over categories and agents); "
            'differential_expression uses weights="uniform", and get_normalized_expression(weights="uniform").'
        )
