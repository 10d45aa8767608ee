"""Loss terms of the coupled mixture VAE (see the user guide for the formulas)."""

from __future__ import annotations

import math

import torch


def nb_log_likelihood(
    x: torch.Tensor,
    log_mu: torch.Tensor,
    theta: torch.Tensor,
    *,
    nonzero: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Negative binomial log-likelihood, summed over genes.

    Parameters
    ----------
    x
        Counts ``(B, D)``.
    log_mu
        Log means, ``(A, B, D)``.
    theta
        Inverse dispersion, broadcastable to ``log_mu`` (``(A, 1, D)`` or ``(A, B, D)``).
    nonzero
        Row and column indices of the non-zero counts (``x.nonzero(as_tuple=True)``); computed when
        not given.

    Returns
    -------
    Log-likelihood per agent and cell, ``(A, B)``; equal to
    ``scvi.distributions.NegativeBinomial(mu, theta).log_prob(x).sum(-1)``.

    Notes
    -----
    Every term that vanishes at ``x = 0`` (the log-gamma terms and ``x log(mu / (theta + mu))``) is
    evaluated on the non-zero counts only, so the cost of the log-gamma functions scales with the
    number of non-zero counts, not with cells times genes.
    """
    log_theta = torch.log(theta)
    log_theta_mu = torch.logaddexp(log_theta, log_mu)
    ll = (theta * (log_theta - log_theta_mu)).sum(-1)
    rows, cols = x.nonzero(as_tuple=True) if nonzero is None else nonzero
    counts = x[rows, cols]
    shape = log_mu.shape
    theta_nz = theta.expand(shape)[:, rows, cols]
    sparse_terms = (
        counts * (log_mu[:, rows, cols] - log_theta_mu[:, rows, cols])
        + torch.lgamma(counts + theta_nz)
        - torch.lgamma(theta_nz)
        - torch.lgamma(counts + 1)
    )
    return ll.index_add(-1, rows, sparse_terms)


def gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """Unit-variance Gaussian log-likelihood summed over genes (the published squared-error loss)."""
    return -0.5 * (x - mean).pow(2).sum(-1) - 0.5 * x.shape[-1] * math.log(2 * math.pi)


def kl_normal_standard(mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """``KL(N(mean, var) || N(0, I))`` summed over the last axis."""
    return 0.5 * (var + mean.pow(2) - 1.0 - torch.log(var)).sum(-1)


def negative_entropy(q: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """``mean_i sum_k q log q`` per agent; ``q`` is ``(A, B, K)``, returns ``(A,)``.

    Masked categories (``q = 0``, ``log_q = -inf``) contribute 0, and so does their gradient: ``log_q`` is
    replaced before the product, since ``torch.where`` on ``q * log_q`` would back-propagate ``0 * inf = NaN``.
    """
    return (q * torch.where(q > 0, log_q, torch.zeros_like(log_q))).sum(-1).mean(-1)


def coupling_distance(
    q: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps: float = 1e-8,
    var_eps: float = 1e-4,
    kind: str = "aitchison",
) -> torch.Tensor:
    """Variance-normalised distance between the agents' categorical posteriors.

    Parameters
    ----------
    q
        Posteriors ``(A, B, K)``; masked categories carry zero mass.
    mask
        Boolean ``(K,)``: surviving categories.
    eps
        Added inside the logarithm.
    var_eps
        Added to the per-category minibatch variance before the inverse square root.
    kind
        ``"aitchison"``: ``||log(q_a + eps) r_a - log(q_b + eps) r_b||^2`` with
        ``r = (Var_batch[q] + var_eps)^(-1/2)`` (the published approximation); ``"clr"``: the same on
        centred log-ratios.

    Returns
    -------
    ``(A, A)`` matrix of mean (over cells) distances; only the upper triangle is used.
    """
    log_q = torch.log(q + eps)
    if kind == "clr":
        n_active = mask.sum().clamp(min=1)
        centre = (log_q * mask).sum(-1, keepdim=True) / n_active
        log_q = log_q - centre
    r = torch.rsqrt(q.var(dim=1, keepdim=True, correction=0) + var_eps)
    z = log_q * r * mask
    diff = z.unsqueeze(0) - z.unsqueeze(1)
    return diff.pow(2).sum(-1).mean(-1)
