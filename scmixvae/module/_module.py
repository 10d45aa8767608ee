"""The torch module of the coupled mixture VAE: A agents evaluated together."""

from __future__ import annotations

import logging
import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from scvi import REGISTRY_KEYS
from scvi.distributions import NegativeBinomial, ZeroInflatedNegativeBinomial
from scvi.module.base import BaseModuleClass, LossOutput, auto_move_data
from torch import nn
from torch.distributions import Normal
from torch.nn import functional as F

from .._constants import CONDITION_KEY, NEIGHBOUR_X_KEY, NORMALISATION_SCALE
from ._augment import AUGMENTATION_STRENGTH, AUGMENTATIONS, Augmentation, AugmenterModule, mix_neighbours, thin_counts
from ._components import StackedBatchNorm, StackedLinear, StackedMLP
from ._losses import (
    category_condition_discrepancy,
    category_condition_divergence,
    category_weights,
    condition_category_means,
    coupling_distance,
    csr_nonzero,
    gaussian_log_likelihood,
    kl_normal_standard,
    nb_log_likelihood,
    nb_log_likelihood_dense,
    negative_entropy,
    nonzero_indices,
    with_flat_index,
)

#: Temperature of the Gumbel-softmax sample of the category at training time (published: 1).
GUMBEL_TEMPERATURE = 1.0
#: Width of the state encoder, the one-layer encoder of the real cell that the state posterior reads.
N_HIDDEN_STATE = 32
#: Weight of the conditions' divergence in the loss (:meth:`CplMixVAEModule.condition_divergence`), in nats per cell.
CONDITION_WEIGHT = 100.0
#: Weight of the conditions' chi-square discrepancy in the loss (:func:`category_condition_discrepancy`).
CONDITION_SHARE_WEIGHT = 30.0
#: Weight of each training minibatch in the running category proportions of the conditions.
CONDITION_MOMENTUM = 0.02
#: Weight of each training minibatch in the running mean of the coupling's category weights (see
#: :meth:`CplMixVAEModule.coupling_weight_caps`).
COUPLING_WEIGHT_MOMENTUM = 0.02

logger = logging.getLogger(__name__)

Likelihood = Literal["nb", "zinb", "gaussian"]


@dataclass(frozen=True)
class CovariateLayout:
    """The covariates registered with the AnnData, as the module reads them (the model fills this in).

    Attributes
    ----------
    n_batch
        Number of batches (a one-hot covariate of every encoder and decoder when more than one).
    n_cats_per_cov
        Categories of each extra categorical covariate (each one-hot).
    n_continuous_cov
        Number of continuous covariates.
    n_conditions
        Number of codes of the registered experimental condition (0: none). The condition is given to no
        encoder or decoder: its effect has to be carried by the state. With two or more, the loss adds a penalty
        on categories that one condition lacks while the others hold them
        (:meth:`CplMixVAEModule.condition_divergence`) and a weaker one on differences between the conditions'
        category proportions (:func:`category_condition_discrepancy`), so that a condition's effect cannot be
        absorbed by splitting types, wholly or in part.
    """

    n_batch: int = 0
    n_cats_per_cov: tuple[int, ...] = ()
    n_continuous_cov: int = 0
    n_conditions: int = 0

    @property
    def width(self) -> int:
        """Length of the covariate vector that encoders and decoders read (see :meth:`CplMixVAEModule.covariates`)."""
        return (self.n_batch if self.n_batch > 1 else 0) + sum(self.n_cats_per_cov) + self.n_continuous_cov


@contextmanager
def eval_mode(module: torch.nn.Module):
    """Put ``module`` in evaluation mode for a read-out and restore its previous mode afterwards."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def check_temperature(tau: float, n_categories: int, *, stacklevel: int = 2) -> None:
    """Warn when the categorical temperature ``tau`` does not fit ``n_categories``.

    The tempered posterior is ``softmax(p / tau)`` with ``p`` on the simplex, so the largest log-odds it
    can express is ``1 / tau``. Below ``2 log K`` the posteriors cannot become confident and the
    categories collapse; far above ``K`` (``tau * K < 0.05``) the softmax saturates and gradients vanish.
    """
    if n_categories < 2:
        return
    if 1.0 / tau < 2.0 * math.log(n_categories):
        warnings.warn(
            f"tau={tau:g} is too large for n_categories={n_categories}: the posteriors cannot become confident "
            f"(1/tau < 2 log K = {2 * math.log(n_categories):.2f}) and categories will collapse. "
            f"Leave tau=None (1/K) or use tau <= {1 / (2 * math.log(n_categories)):.3g}.",
            UserWarning,
            stacklevel=stacklevel,
        )
    elif tau * n_categories < 0.05:
        warnings.warn(
            f"tau={tau:g} is very small for n_categories={n_categories} (tau * K = {tau * n_categories:.3g} < 0.05): "
            "the categorical head saturates and stops learning. Leave tau=None (1/K).",
            UserWarning,
            stacklevel=stacklevel,
        )


class CplMixVAEModule(BaseModuleClass):
    """Coupled mixture VAE: ``A`` autoencoding agents with stacked weights and a coupling loss.

    Parameters
    ----------
    n_input
        Number of genes ``D``.
    n_agents
        Number of agents ``A``.
    n_categories
        Number of categories ``K`` (the maximum, before pruning).
    n_state
        Dimension ``S`` of the continuous state latent.
    n_hidden
        Width of the hidden layers.
    n_layers
        Hidden layers of the encoder trunk and of the decoder.
    n_latent
        Width ``L`` of the encoder trunk's output (batch-normalised without affine parameters).
    covariates
        The registered covariates and experimental condition (:class:`CovariateLayout`); ``None``: none.
    likelihood
        ``"gaussian"`` on log1p of library-normalised expression (published), ``"nb"`` or ``"zinb"`` on
        counts with the observed library size as offset.
    dispersion
        ``"gene"`` or ``"gene-batch"`` inverse dispersion of the count likelihoods.
    input_dropout
        Probability of the independent per-agent input dropout at training time, applied to every agent's view
        whatever the ``augmentation``.
    tau
        Temperature of the categorical head; ``None`` ties it to ``1 / K`` of the surviving categories.
    beta
        Weight of the state KL divergence.
    coupling_weight
        Weight ``lambda`` of the coupling distance (on centred log-ratios, :func:`coupling_distance` with
        ``kind="clr"``).
    augmentation
        How each agent's view of a cell is made at training time (read-outs always encode the real cell, and
        the decoders always reconstruct it): ``"dropout"`` (input dropout only, published fallback),
        ``"thinning"`` (binomial thinning that removes half of the counts on average), ``"knn"`` (mixing with
        one of the cell's nearest neighbours, whose counts the data loader provides as ``x_neighbour``, at a weight
        of at most 0.3), ``"learned"`` (copies from a trained :class:`~scmixvae.module.AugmenterModule`, perturbed
        by 4 posterior standard deviations in its latent space).

    Notes
    -----
    The state posterior ``q(s | x, c)`` reads, besides ``c``, a one-layer encoder of its own (``N_HIDDEN_STATE``
    units) of the real cell's log-normalised expression, never augmented nor dropped out (the published model read
    the categorical trunk ``h`` of the augmented view, which keeps mostly the type). The decoder reads
    ``[c; c ⊗ s]``: each category has its own linear map of the state into the first hidden layer, so that states
    act through type-specific gene programs (published: ``[c; s]``).
    """

    def __init__(
        self,
        n_input: int,
        *,
        n_agents: int = 2,
        n_categories: int = 10,
        n_state: int = 2,
        n_hidden: int = 100,
        n_layers: int = 2,
        n_latent: int = 10,
        covariates: CovariateLayout | None = None,
        likelihood: Likelihood = "nb",
        dispersion: Literal["gene", "gene-batch"] = "gene",
        input_dropout: float = 0.5,
        tau: float | None = None,
        beta: float = 1.0,
        coupling_weight: float = 1.0,
        augmentation: Augmentation = "dropout",
    ):
        super().__init__()
        if augmentation not in AUGMENTATIONS:
            raise ValueError(f"augmentation must be one of {AUGMENTATIONS}, got {augmentation!r}.")
        self.augmentation = augmentation
        self.augmentation_strength = AUGMENTATION_STRENGTH[augmentation]
        self.n_input, self.n_agents, self.n_categories, self.n_state = n_input, n_agents, n_categories, n_state
        layout = covariates or CovariateLayout()
        self.n_batch, self.n_cats_per_cov = layout.n_batch, list(layout.n_cats_per_cov)
        self.n_conditions, self.n_cov = layout.n_conditions, layout.width
        self.likelihood, self.dispersion = likelihood, dispersion
        self.input_dropout, self.tau = input_dropout, tau
        self.beta, self.coupling_weight = beta, coupling_weight
        if tau is not None:
            check_temperature(tau, n_categories, stacklevel=3)

        a = n_agents
        self.encoder = StackedMLP(a, n_input, n_hidden, n_layers, n_cov=self.n_cov)
        self.trunk_out = StackedLinear(a, n_hidden, n_latent)
        self.trunk_norm = StackedBatchNorm(a, n_latent)
        self.category_head = StackedLinear(a, n_latent, n_categories)
        # the state posterior reads a one-layer encoder of its own of the real (unaugmented) cell
        self.state_encoder = StackedMLP(a, n_input, N_HIDDEN_STATE, 1, n_cov=self.n_cov)
        self.state_head = StackedLinear(a, N_HIDDEN_STATE + n_categories, 2 * n_state)
        n_dec_in = n_categories * (1 + n_state)  # [c; c ⊗ s] (see decoder_input)
        self.decoder = StackedMLP(a, n_dec_in, n_hidden, n_layers, n_cov=self.n_cov, inject_covariates=True)
        self.px_head = StackedLinear(a, n_hidden, n_input)
        if likelihood == "zinb":
            self.px_dropout_head = StackedLinear(a, n_hidden, n_input)
        if likelihood in ("nb", "zinb"):
            n_disp = self.n_batch if dispersion == "gene-batch" else 1
            self.px_r = nn.Parameter(torch.randn(a, n_disp, n_input))
        self.register_buffer("category_mask", torch.ones(n_categories, dtype=torch.bool))
        # running category proportions of each condition and the conditions' shares (see condition_divergence)
        g = max(self.n_conditions, 1)
        self.register_buffer("condition_means", torch.zeros(a, g, n_categories), persistent=False)
        self.register_buffer("condition_shares", torch.zeros(g), persistent=False)
        self.register_buffer("condition_seen", torch.zeros(g, dtype=torch.bool), persistent=False)
        # running mean of the coupling's weight of every category (see coupling_weight_caps); 0: not started
        self.register_buffer("coupling_weights", torch.zeros(a, 1, n_categories), persistent=False)
        # set by the training plan (CplMixVAETrainingPlan): during the state phase (see :meth:`inference`); at the end
        # of a run, the coupling's factor reached (where a later warm-up of the fit starts) and the optimiser's state
        # (which the next run of the same parameters loads)
        self.categories_frozen = False
        self.coupling_factor = 1.0
        self.carried_optimizer_state: tuple | None = None
        self.augmenter = (
            AugmenterModule(n_input, n_categories, noise=self.augmentation_strength)
            if augmentation == "learned"
            else None
        )

    # ------------------------------------------------------------------ helpers
    @property
    def n_active_categories(self) -> int:
        """Number of categories that survive pruning."""
        return int(self.category_mask.sum())

    def covariates(self, batch_index, cat_covs, cont_covs) -> torch.Tensor | None:
        """One row per cell of the covariates every encoder and decoder reads, or ``None`` without any.

        The batch one-hot (only with more than one batch), each categorical covariate one-hot, then the continuous
        covariates, concatenated in that order.
        """
        parts = []
        if self.n_batch > 1:
            parts.append(F.one_hot(batch_index.reshape(-1).long(), self.n_batch).float())
        if self.n_cats_per_cov:
            for cov, n in zip(torch.split(cat_covs, 1, dim=1), self.n_cats_per_cov, strict=True):
                parts.append(F.one_hot(cov.reshape(-1).long(), n).float())
        if cont_covs is not None and cont_covs.shape[-1] > 0:
            parts.append(cont_covs.float())
        return torch.cat(parts, dim=-1) if parts else None

    @staticmethod
    def normalise(x: torch.Tensor, library: torch.Tensor) -> torch.Tensor:
        """``log1p`` of library-normalised counts (encoder input and Gaussian target)."""
        return torch.log1p(x * (NORMALISATION_SCALE / library.clamp(min=1.0)))

    @staticmethod
    def normalise_nonzero(
        x: torch.Tensor,
        library: torch.Tensor,
        nonzero: tuple[torch.Tensor, ...],
        counts: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`normalise` computed on the non-zero counts only: the dense result and its non-zero values.

        ``nonzero``: :func:`~scmixvae.module._losses.nonzero_indices` of ``x`` (or its rows and columns);
        ``counts``: the values of ``x`` there, when known (``x`` is then read for its shape only and may be
        sparse). ``log1p(0) = 0``, so the rest stays zero; on the CPU this costs a fraction of the dense
        computation.
        """
        rows, _, flat = with_flat_index(nonzero, x.shape[-1])
        if counts is None:
            counts = x.reshape(-1).index_select(0, flat)
        scale = (NORMALISATION_SCALE / library.clamp(min=1.0)).reshape(-1).index_select(0, rows)
        values = torch.log1p(counts * scale)
        x_norm = library.new_zeros(x.shape)
        x_norm.view(-1).index_copy_(0, flat, values)
        return x_norm, values

    def _dropout(self, values: torch.Tensor) -> torch.Tensor:
        """Independent input dropout of each agent's view (entries rescaled by ``1 / keep``)."""
        if self.input_dropout <= 0:
            return values
        keep = 1.0 - self.input_dropout
        return values * (torch.rand_like(values) < keep) / keep

    def _augment(
        self,
        x: torch.Tensor,
        x_norm: torch.Tensor,
        library: torch.Tensor,
        nonzero: tuple[torch.Tensor, ...] | None,
        x_neighbour: torch.Tensor | None = None,
        x_norm_nonzero: torch.Tensor | None = None,
        counts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Each agent's view of the cells at training time, ``(A, B, D)``; the shared real input otherwise.

        ``"dropout"`` and ``"thinning"`` work on the non-zero entries only (a zero stays zero), which costs a
        fraction of a dense mask on sparse expression data. ``x_norm_nonzero`` and ``counts``: the values of
        ``x_norm`` and ``x`` at ``nonzero``, when known (``x`` may then be a sparse CSR tensor).
        """
        aug, a = self.augmentation, self.n_agents
        if not self.training or (aug == "dropout" and self.input_dropout <= 0):
            return x_norm
        if aug == "dropout" and nonzero is None:  # accelerator: a dense mask (zeros stay zero either way)
            return self._dropout(x_norm.expand(a, -1, -1))
        if aug in ("dropout", "thinning") or (aug == "knn" and x_neighbour is None):
            rows, _, flat = nonzero_indices(x) if nonzero is None else with_flat_index(nonzero, x.shape[-1])
            if aug == "thinning":
                counts = x.reshape(-1).index_select(0, flat) if counts is None else counts
                thinned, thinned_library = thin_counts(counts, rows, x.shape[0], a, self.augmentation_strength)
                values = torch.log1p(thinned * (NORMALISATION_SCALE / thinned_library.clamp(min=1.0)[:, rows]))
            else:  # dropout only (also "knn" when the loader gives no neighbours, e.g. a custom loop)
                if x_norm_nonzero is None:
                    x_norm_nonzero = x_norm.reshape(-1).index_select(0, flat)
                values = x_norm_nonzero.expand(a, -1)
            views = library.new_zeros((a, *x.shape))
            views.view(a, -1).index_copy_(1, flat, self._dropout(values))
            return views
        if aug == "knn":
            x = x.to_dense() if x.layout != torch.strided else x
            views = mix_neighbours(x, library, x_neighbour, a, self.augmentation_strength)
        else:  # learned
            views = self.augmenter.augment(x_norm, a) if bool(self.augmenter.trained) else x_norm.expand(a, -1, -1)
        return self._dropout(views)

    # ------------------------------------------------------------------ scvi-tools interface
    def _get_inference_input(self, tensors: dict[str, torch.Tensor], **kwargs) -> dict:
        return {
            "x": tensors[REGISTRY_KEYS.X_KEY],
            "batch_index": tensors.get(REGISTRY_KEYS.BATCH_KEY),
            "cat_covs": tensors.get(REGISTRY_KEYS.CAT_COVS_KEY),
            "cont_covs": tensors.get(REGISTRY_KEYS.CONT_COVS_KEY),
            "x_neighbour": tensors.get(NEIGHBOUR_X_KEY),
        }

    def _get_generative_input(self, tensors: dict[str, torch.Tensor], inference_outputs: dict, **kwargs) -> dict:
        return {
            "s": inference_outputs["s"],
            "c": inference_outputs["c"],
            "library": inference_outputs["library"],
            "batch_index": tensors.get(REGISTRY_KEYS.BATCH_KEY),
            "cov": inference_outputs["cov"],
        }

    def categorical_posterior(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tempered categorical posterior ``softmax(softmax(W h + b) / tau)`` over surviving categories."""
        mask = self.category_mask
        logits = self.category_head(h).masked_fill(~mask, float("-inf"))
        p = torch.softmax(logits, dim=-1)
        # 1 / tau as a tensor when tied to K: reading the number of categories would make the host wait
        inv_tau = 1.0 / self.tau if self.tau is not None else mask.sum().clamp(min=1).to(p.dtype)
        tempered = (p * inv_tau).masked_fill(~mask, float("-inf"))
        log_q = torch.log_softmax(tempered, dim=-1)
        return log_q.exp(), log_q

    def state_posterior(self, hs: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of ``q(s | x, c)`` from the state features ``hs`` of :meth:`inference`."""
        out = self.state_head(torch.cat([hs, c], dim=-1))
        mean, log_var = out.split(self.n_state, dim=-1)
        return mean, torch.exp(log_var.clamp(-15.0, 15.0)) + 1e-6

    def consensus_state(self, q: torch.Tensor, hs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every agent's state posterior conditioned on the consensus category (argmax of the mean ``q``).

        ``hs`` are the state features of :meth:`inference`.

        Returns the one-hot consensus ``c`` ``(A, B, K)`` and the posterior mean and variance ``(A, B, S)``.
        """
        consensus = q.mean(0).argmax(-1)
        c = F.one_hot(consensus, self.n_categories).float().expand(self.n_agents, -1, -1)
        mean, var = self.state_posterior(hs, c)
        return c, mean, var

    @auto_move_data
    def inference(
        self,
        x: torch.Tensor,
        batch_index: torch.Tensor | None = None,
        cat_covs: torch.Tensor | None = None,
        cont_covs: torch.Tensor | None = None,
        category: torch.Tensor | None = None,
        x_neighbour: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Encode a minibatch with every agent.

        Parameters
        ----------
        x
            Counts ``(B, D)``, dense or a sparse CSR tensor (training minibatches on the CPU, see
            :meth:`~scmixvae.model.CplMixVAE.train`).
        batch_index, cat_covs, cont_covs
            Covariates as registered.
        category
            Optional category index per cell ``(B,)`` on which to condition the state posterior of every
            agent (instead of each agent's own sample or argmax).
        x_neighbour
            Counts of one nearest neighbour of each cell ``(B, D)`` (``augmentation="knn"``, training only).

        Returns
        -------
        ``q`` and ``log_q`` ``(A, B, K)``, the category ``c`` fed to the state head and the decoder
        (Gumbel-softmax sample in training, one-hot argmax otherwise), the state posterior ``qs_m``,
        ``qs_v`` and sample ``s`` ``(A, B, S)``, the trunk output ``h``, the features the state posterior
        reads ``hs`` (the state encoder's output), ``library`` ``(B, 1)``, ``x_norm``, the covariate vector ``cov``,
        the non-zero entries
        ``nonzero`` and their ``counts`` (CPU training) and the dense counts ``x`` (``None`` when the sparse
        minibatch was not densified).
        """
        # non-zero entries: shared by the normalisation, the dropout views and the NB loss on the CPU; read-outs
        # need none of them, and on an accelerator all work densely (finding them would make the host wait for
        # the device every step)
        find_nonzero = self.training and x.device.type == "cpu"
        counts = None
        if x.layout == torch.sparse_csr and find_nonzero:  # read from the CSR structure, no dense search
            nonzero, counts = csr_nonzero(x)
            library = counts.new_zeros(x.shape[0]).index_add_(0, nonzero[0], counts).unsqueeze(-1)
        else:
            x = x.to_dense() if x.layout != torch.strided else x
            nonzero = nonzero_indices(x) if find_nonzero else None
            library = x.sum(-1, keepdim=True)
        if nonzero is None:
            x_norm, x_norm_nonzero = self.normalise(x, library), None
        else:  # the dense result for the state encoder, the values for the agents' views
            x_norm, x_norm_nonzero = self.normalise_nonzero(x, library, nonzero, counts)
        cov = self.covariates(batch_index, cat_covs, cont_covs)
        if self.training and self.categories_frozen:
            # state phase: the categorical path reads the real cell as in a read-out and learns nothing
            with torch.no_grad(), eval_mode(self.trunk_norm):
                h = self.trunk_norm(self.trunk_out(self.encoder(x_norm, cov)))
                q, log_q = self.categorical_posterior(h)
        else:
            views = self._augment(x, x_norm, library, nonzero, x_neighbour, x_norm_nonzero, counts)
            h = self.trunk_norm(self.trunk_out(self.encoder(views, cov)))
            q, log_q = self.categorical_posterior(h)
        hs = self.state_encoder(x_norm, cov)
        k = self.n_categories
        if category is not None:
            c = F.one_hot(category.reshape(-1).long(), k).float().expand(self.n_agents, -1, -1)
        elif self.training:
            gumbel = -torch.log(-torch.log(torch.rand_like(q).clamp_(1e-10, 1.0 - 1e-7)))
            logits = (log_q + gumbel).masked_fill(~self.category_mask, float("-inf"))
            c = torch.softmax(logits / GUMBEL_TEMPERATURE, dim=-1)
        else:
            c = F.one_hot(q.argmax(-1), k).float()
        qs_m, qs_v = self.state_posterior(hs, c)
        s = qs_m + qs_v.sqrt() * torch.randn_like(qs_m)
        return {
            "q": q, "log_q": log_q, "c": c, "qs_m": qs_m, "qs_v": qs_v, "s": s, "h": h, "hs": hs,
            "library": library, "x_norm": x_norm, "cov": cov, "nonzero": nonzero, "counts": counts,
            "x": None if x.layout != torch.strided else x,
        }  # fmt: skip

    def decoder_input(self, c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """``[c; c ⊗ s]``: the category and, for each category, a copy of the state (a state map of its own)."""
        return torch.cat([c, (c.unsqueeze(-1) * s.unsqueeze(-2)).flatten(-2)], dim=-1)

    @auto_move_data
    def generative(
        self,
        s: torch.Tensor,
        c: torch.Tensor,
        library: torch.Tensor,
        batch_index: torch.Tensor | None = None,
        cov: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Decode ``[c; s]`` with every agent into the likelihood's parameters ``(A, B, D)``."""
        hidden = self.decoder(self.decoder_input(c, s), cov)
        out = self.px_head(hidden)
        if self.likelihood == "gaussian":
            return {"px_mean": out}
        px_r = self.px_r
        if self.dispersion == "gene-batch" and self.n_batch > 1:
            px_r = px_r[:, batch_index.reshape(-1).long()]
        # the log means are px_log_scale + px_log_library (:meth:`log_rate`); the fused NB likelihood never forms
        # them, and in training on the CPU it takes the logits themselves (the log-softmax happens inside it)
        result = {"px_logits": out, "px_log_library": torch.log(library), "px_r": px_r.exp()}
        if not (self.training and self.likelihood == "nb" and out.device.type == "cpu"):
            result["px_log_scale"] = torch.log_softmax(out, dim=-1)
        if self.likelihood == "zinb":
            result["px_dropout"] = self.px_dropout_head(hidden)
        return result

    @staticmethod
    def log_scale(generative_outputs: dict) -> torch.Tensor:
        """Log of the decoder's normalised expression, ``(A, B, D)`` (the log-softmax of ``px_logits``)."""
        if "px_log_scale" in generative_outputs:
            return generative_outputs["px_log_scale"]
        return torch.log_softmax(generative_outputs["px_logits"], dim=-1)

    @classmethod
    def log_rate(cls, generative_outputs: dict) -> torch.Tensor:
        """Log means of the count likelihoods, ``(A, B, D)``: the decoder's log scale plus the log library size."""
        return cls.log_scale(generative_outputs) + generative_outputs["px_log_library"]

    def log_likelihood(self, x: torch.Tensor, inference_outputs: dict, generative_outputs: dict) -> torch.Tensor:
        """Log-likelihood of each cell under each agent's decoder, ``(A, B)``.

        ``x``: the counts, dense or sparse CSR (densified here where a likelihood needs them dense).
        """
        if self.likelihood == "gaussian":
            return gaussian_log_likelihood(inference_outputs["x_norm"], generative_outputs["px_mean"])
        theta = generative_outputs["px_r"]
        counts = inference_outputs.get("counts")
        fused = self.likelihood == "nb" and x.device.type == "cpu"
        if x.layout != torch.strided and not (fused and counts is not None):  # the fused node reads the counts
            x = inference_outputs["x"] if inference_outputs.get("x") is not None else x.to_dense()
        if self.likelihood == "nb":
            log_library = generative_outputs["px_log_library"]
            if not fused:  # accelerators: dense, no non-zero search (see inference)
                return nb_log_likelihood_dense(x, self.log_scale(generative_outputs), theta, log_library=log_library)
            # the CPU: the fused node, the log-softmax of the logits included
            return nb_log_likelihood(
                x,
                generative_outputs["px_logits"],
                theta,
                nonzero=inference_outputs.get("nonzero"),
                log_library=log_library,
                logits=True,
                counts=counts,
            )
        dist = ZeroInflatedNegativeBinomial(
            mu=self.log_rate(generative_outputs).exp(), theta=theta, zi_logits=generative_outputs["px_dropout"]
        )
        return dist.log_prob(x).sum(-1)

    def px_distribution(self, generative_outputs: dict) -> torch.distributions.Distribution:
        """Return the decoder's distribution as an object (``scvi.distributions`` for counts)."""
        if self.likelihood == "gaussian":
            return Normal(generative_outputs["px_mean"], 1.0)
        log_scale, theta = self.log_scale(generative_outputs), generative_outputs["px_r"]
        rate, scale = (log_scale + generative_outputs["px_log_library"]).exp(), log_scale.exp()
        if self.likelihood == "nb":
            return NegativeBinomial(mu=rate, theta=theta, scale=scale)
        return ZeroInflatedNegativeBinomial(
            mu=rate, theta=theta, zi_logits=generative_outputs["px_dropout"], scale=scale
        )

    def loss(
        self,
        tensors: dict[str, torch.Tensor],
        inference_outputs: dict,
        generative_outputs: dict,
        kl_weight: float = 1.0,
        coupling_factor: float | torch.Tensor = 1.0,
        coupling_weight_cap: float | None = None,
    ) -> LossOutput:
        """Compute the cpl-mixVAE loss.

        ``max(A - 1, 1) * sum_a mean_i [Rec_a + beta * kl_weight * KL_a] + sum_{a<b} [NE_a + NE_b + lambda * D_ab]``,
        ``lambda`` being ``coupling_factor * coupling_weight`` (the training plan's coupling schedule).
        ``coupling_weight_cap``: caps each category's weight in ``D_ab`` at that multiple of its running mean
        (:meth:`coupling_weight_caps`; ``None``: no cap).
        """
        x = tensors[REGISTRY_KEYS.X_KEY]
        a = self.n_agents
        rec = -self.log_likelihood(x, inference_outputs, generative_outputs)  # (A, B)
        kl = kl_normal_standard(inference_outputs["qs_m"], inference_outputs["qs_v"])  # (A, B)
        q, log_q = inference_outputs["q"], inference_outputs["log_q"]
        neg_ent = negative_entropy(q, log_q)  # (A,)
        elbo_terms = (rec + self.beta * kl_weight * kl).mean(-1)  # (A,)
        loss = max(a - 1, 1) * elbo_terms.sum()
        extra = {}
        if a > 1:
            caps = None if coupling_weight_cap is None else self.coupling_weight_caps(q, coupling_weight_cap)
            dist = coupling_distance(q, self.category_mask, kind="clr", weight_cap=caps)
            pairs = torch.triu_indices(a, a, offset=1, device=dist.device)
            pair_dist = dist[pairs[0], pairs[1]]
            # sum_{a<b} (NE_a + NE_b) = (A - 1) sum_a NE_a
            loss = loss + (a - 1) * neg_ent.sum() + coupling_factor * self.coupling_weight * pair_dist.sum()
            extra["coupling"] = pair_dist.mean().detach()
            with torch.no_grad():
                labels = q.argmax(-1)
                extra["agreement"] = (labels == labels[:1]).all(0).float().mean()
        condition = tensors.get(CONDITION_KEY)
        if condition is not None and self.n_conditions > 1:
            divergence = self.condition_divergence(q, condition)  # (A,)
            gap = category_condition_discrepancy(q, condition, self.n_conditions)  # (A,)
            loss = loss + CONDITION_WEIGHT * divergence.sum() + CONDITION_SHARE_WEIGHT * gap.sum()
            extra["condition_divergence"] = divergence.detach().mean()
            extra["condition_discrepancy"] = gap.detach().mean()
        per_agent = torch.stack([rec.detach().mean(-1), kl.detach().mean(-1), neg_ent.detach()])  # one reduction
        for i, (rec_i, kl_i, ne_i) in enumerate(per_agent.unbind(-1)):  # dictionary entries for the logger only
            extra[f"reconstruction_agent{i}"], extra[f"kl_agent{i}"], extra[f"neg_entropy_agent{i}"] = rec_i, kl_i, ne_i
        return LossOutput(
            loss=loss,
            reconstruction_loss=rec.mean(0),
            kl_local=kl.mean(0),
            extra_metrics=extra,
        )

    def coupling_weight_caps(self, q: torch.Tensor, factor: float) -> torch.Tensor:
        """Largest weight of each category in the coupling: ``factor`` times its running mean, ``(A, 1, K)``.

        The coupling divides each category by its spread in the minibatch (:func:`coupling_distance`). A
        minibatch that happens to hold no cell of a type of a few percent leaves that category without spread,
        and its weight jumps from about 5 to 100 for that step, enough to move cells out of a trained type. A
        cap at a multiple of the running mean (each training minibatch weighs :data:`COUPLING_WEIGHT_MOMENTUM`;
        the first sets it) clips such jumps and leaves a category that most minibatches lack at its usual weight.
        Only the weight's value is clipped: the gradient through the minibatch's spread, which keeps a category
        from emptying, still flows (taken at the cap). The running mean follows training minibatches while the
        categories train; no gradient flows through it. Entries of 0 (no minibatch seen yet) cap nothing.
        """
        with torch.no_grad():
            if self.training and not self.categories_frozen:
                weights = category_weights(q).to(self.coupling_weights.dtype)
                started = (self.coupling_weights > 0).any()  # a tensor: no host synchronisation on the training path
                running = self.coupling_weights.lerp(weights, COUPLING_WEIGHT_MOMENTUM)
                self.coupling_weights.copy_(torch.where(started, running, weights))
            return factor * self.coupling_weights

    def condition_divergence(self, q: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """Compute each agent's divergence in category proportions between conditions.

        See :func:`category_condition_divergence`. A minibatch holds too few cells of a small type to tell whether a
        condition lacks it, and the logarithm of a proportion estimated as 0 is unbounded. So the value comes from
        running proportions (each training minibatch weighs :data:`CONDITION_MOMENTUM`; a condition's first
        minibatch sets its start) and the gradient from the minibatch's own. In the loss it weighs
        :data:`CONDITION_WEIGHT`.

        Parameters
        ----------
        q
            Posteriors ``(A, B, K)``.
        condition
            Condition code per cell ``(B,)`` or ``(B, 1)``; negative: unknown, left out.
        """
        means, n = condition_category_means(q, condition, self.n_conditions)
        present = n > 0
        frac = n / n.sum().clamp(min=1)
        if self.training:
            with torch.no_grad():
                first = (present & ~self.condition_seen)[None, :, None]
                running = torch.where(first, means, self.condition_means.lerp(means, CONDITION_MOMENTUM))
                self.condition_means.copy_(torch.where(present[None, :, None], running, self.condition_means))
                started = self.condition_seen.any()  # a tensor: no host synchronisation on the training path
                self.condition_shares.copy_(
                    torch.where(started, self.condition_shares.lerp(frac, CONDITION_MOMENTUM), frac)
                )
                self.condition_seen |= present
        seen = self.condition_seen
        value = torch.where(seen[None, :, None], self.condition_means, means.detach())
        proportions = value + (means - means.detach()) * present[None, :, None]
        shares = torch.where(seen.any(), self.condition_shares, frac) * (seen | present)
        return category_condition_divergence(proportions, shares / shares.sum().clamp(min=1e-12))

    @torch.inference_mode()
    def sample(self, tensors: dict[str, torch.Tensor], n_samples: int = 1) -> torch.Tensor:
        """Sample counts (or Gaussian expression) from agent 0's generative model, ``(n_samples, B, D)``."""
        _, generative_outputs = self.forward(tensors, compute_loss=False)
        dist = self.px_distribution(generative_outputs)
        return dist.sample((n_samples,))[:, 0]
