"""scvi-tools' model-fit read-outs (ELBO, reconstruction error, marginal log-likelihood) for the mixture."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from anndata import AnnData

from .. import _validation as check
from ..module._losses import kl_normal_standard

_EXTRA_ARGUMENTS = (
    "Custom `dataloader`s and forward keyword arguments are not supported by CplMixVAE; "
    "pass `adata`, `indices` and `batch_size`."
)


class CplMixVAELikelihoodMixin:
    """``get_elbo``, ``get_reconstruction_error`` and ``get_marginal_ll`` with scvi-tools' signatures.

    Each agent is a generative model of its own, ``p(x | c, s) p(s) p(c)`` with a uniform prior over the surviving
    categories and a standard normal state; its ELBO takes the expectation over its categorical posterior
    ``q_a(c | x)`` exactly (one decode per surviving category) and over the state posterior with one sample.
    ``agent=None`` averages the agents' per-cell values. With ``likelihood="gaussian"`` the likelihood is that of
    the log1p-normalised expression (unit variance), not of the counts, so the values are comparable only between
    models with the same likelihood.
    """

    def _minibatches(self, adata, indices, batch_size, dataloader, data_loader_kwargs, kwargs):
        if dataloader is not None or kwargs:
            raise ValueError(_EXTRA_ARGUMENTS)
        return self.iter_inference(adata, indices, batch_size=batch_size, data_loader_kwargs=data_loader_kwargs)

    def _per_category_terms(self, inputs: dict, out: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Categorical posterior, log-likelihood and state KL per surviving category, each ``(A, B, K')``."""
        module = self.module
        active = module.category_mask.nonzero().squeeze(-1)
        x = inputs["x"].to(out["library"].device)
        log_lik, kl = [], []
        for k in active.tolist():
            c = torch.zeros_like(out["q"])
            c[..., k] = 1.0
            mean, var = module.state_posterior(out["hs"], c)
            s = mean + var.sqrt() * torch.randn_like(mean)
            gen = module.generative(s, c, out["library"], inputs.get("batch_index"), out["cov"])
            log_lik.append(module.log_likelihood(x, out, gen))
            kl.append(kl_normal_standard(mean, var))
        q = out["q"][..., active]
        return q / q.sum(-1, keepdim=True), torch.stack(log_lik, -1), torch.stack(kl, -1)

    def _per_cell(self, values: list[torch.Tensor], agent: int | None, return_mean: bool) -> float | torch.Tensor:
        per_cell = torch.cat(values, dim=1)  # (A, n)
        per_cell = (per_cell.mean(0) if agent is None else per_cell[agent]).cpu()
        return float(per_cell.mean()) if return_mean else per_cell

    @torch.inference_mode()
    def get_elbo(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
        dataloader=None,
        return_mean: bool = True,
        data_loader_kwargs: dict | None = None,
        *,
        agent: int | None = None,
        **kwargs,
    ) -> float | torch.Tensor:
        """Evidence lower bound of each cell (higher is better), as scvi-tools' ``get_elbo``.

        ``E_q(c) [E_q(s|c) log p(x | c, s) - KL(q(s | x, c) || N(0, I))] - KL(q(c | x) || uniform)`` per agent
        (see the class notes); the training loss weights the KL by ``beta`` and adds the coupling, this does not.

        Parameters
        ----------
        adata
            AnnData with the training genes; defaults to the training data.
        indices
            Cells to use, as integer positions or a boolean mask; all by default.
        batch_size
            Minibatch size (``scvi.settings.batch_size`` by default).
        dataloader
            Not supported (``None``).
        return_mean
            Return the mean over cells (a float) instead of the value of each cell (a tensor ``(n_cells,)``).
        data_loader_kwargs
            Keyword arguments of the data loader.
        agent
            One agent's ELBO; ``None``: the mean over the agents.
        **kwargs
            Not supported.
        """
        self._check_agent(agent)
        values = []
        for inputs, out in self._minibatches(adata, indices, batch_size, dataloader, data_loader_kwargs, kwargs):
            q, log_lik, kl = self._per_category_terms(inputs, out)
            kl_c = (q * torch.log(q.clamp_min(1e-12) * q.shape[-1])).sum(-1)
            values.append((q * (log_lik - kl)).sum(-1) - kl_c)
        return self._per_cell(values, agent, return_mean)

    @torch.inference_mode()
    def get_reconstruction_error(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
        dataloader=None,
        return_mean: bool = True,
        data_loader_kwargs: dict | None = None,
        *,
        agent: int | None = None,
        **kwargs,
    ) -> dict[str, float | torch.Tensor]:
        """Reconstruction loss ``-E_q(c) E_q(s|c) log p(x | c, s)`` (lower is better), as scvi-tools' method.

        Parameters are those of :meth:`get_elbo`.

        Returns
        -------
        ``{"reconstruction_loss": value}``: the mean over cells, or a tensor ``(n_cells,)``.
        """
        self._check_agent(agent)
        values = []
        for inputs, out in self._minibatches(adata, indices, batch_size, dataloader, data_loader_kwargs, kwargs):
            q, log_lik, _ = self._per_category_terms(inputs, out)
            values.append(-(q * log_lik).sum(-1))
        return {"reconstruction_loss": self._per_cell(values, agent, return_mean)}

    @torch.inference_mode()
    def get_marginal_ll(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        n_mc_samples: int = 1000,
        batch_size: int | None = None,
        return_mean: bool = True,
        dataloader=None,
        data_loader_kwargs: dict | None = None,
        *,
        agent: int | None = None,
        **kwargs,
    ) -> float | torch.Tensor:
        """Importance-sampled marginal log-likelihood ``log p(x)`` of each cell (higher is better).

        ``n_mc_samples`` draws of ``c ~ q(c | x)`` and ``s ~ q(s | x, c)`` per cell and agent, weighted by
        ``p(x | c, s) p(s) p(c) / (q(s | x, c) q(c | x))``. Other parameters are those of :meth:`get_elbo`.
        """
        self._check_agent(agent)
        check.check_int("n_mc_samples", n_mc_samples)
        module, values = self.module, []
        for inputs, out in self._minibatches(adata, indices, batch_size, dataloader, data_loader_kwargs, kwargs):
            x = inputs["x"].to(out["library"].device)
            q = out["q"] * module.category_mask
            q = q / q.sum(-1, keepdim=True)
            log_prior_c = -math.log(module.n_active_categories)
            log_w = []
            for _ in range(n_mc_samples):
                code = torch.distributions.Categorical(probs=q).sample()  # (A, B)
                c = torch.nn.functional.one_hot(code, q.shape[-1]).to(q.dtype)
                mean, var = module.state_posterior(out["hs"], c)
                s = mean + var.sqrt() * torch.randn_like(mean)
                gen = module.generative(s, c, out["library"], inputs.get("batch_index"), out["cov"])
                log_ps = torch.distributions.Normal(0.0, 1.0).log_prob(s).sum(-1)
                log_qs = torch.distributions.Normal(mean, var.sqrt()).log_prob(s).sum(-1)
                log_qc = torch.log(q.gather(-1, code.unsqueeze(-1)).squeeze(-1).clamp_min(1e-12))
                log_w.append(module.log_likelihood(x, out, gen) + log_ps - log_qs + log_prior_c - log_qc)
            values.append(torch.logsumexp(torch.stack(log_w), 0) - np.log(n_mc_samples))
        return self._per_cell(values, agent, return_mean)
