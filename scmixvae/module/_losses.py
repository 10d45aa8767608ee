"""Loss terms of the coupled mixture VAE (see the user guide for the formulas)."""

from __future__ import annotations

import math

import torch


def nb_log_likelihood(
    x: torch.Tensor, log_mu: torch.Tensor, theta: torch.Tensor, *, log_x_factorial: torch.Tensor | None = None
) -> torch.Tensor:
    """Negative binomial log-likelihood, summed over genes.

    Parameters
    ----------
    x
        Counts ``(B, D)``.
    log_mu
        Log means, ``(B, D)`` or ``(A, B, D)``.
    theta
        Inverse dispersion, broadcastable to ``log_mu``.
    log_x_factorial
        ``lgamma(x + 1).sum(-1)``, shape ``(B,)``; pass it to compute it once for all agents.

    Returns
    -------
    Log-likelihood per cell (and agent), shape ``log_mu.shape[:-1]``. Equal to
    ``scvi.distributions.NegativeBinomial(mu, theta).log_prob(x).sum(-1)``.
    """
    log_theta = torch.log(theta)
    log_theta_mu = torch.logaddexp(log_theta, log_mu)
    ll = theta * (log_theta - log_theta_mu) + x * (log_mu - log_theta_mu) + torch.lgamma(x + theta) - torch.lgamma(theta)
    if log_x_factorial is None:
        log_x_factorial = torch.lgamma(x + 1).sum(-1)
    return ll.sum(-1) - log_x_factorial


def gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """Unit-variance Gaussian log-likelihood summed over genes (the published squared-error loss)."""
    return -0.5 * (x - mean).pow(2).sum(-1) - 0.5 * x.shape[-1] * math.log(2 * math.pi)


def kl_normal_standard(mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """``KL(N(mean, var) || N(0, I))`` summed over the last axis."""
    return 0.5 * (var + mean.pow(2) - 1.0 - torch.log(var)).sum(-1)


def negative_entropy(q: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """``mean_i sum_k q log q`` per agent; ``q`` is ``(A, B, K)``, returns ``(A,)``."""
    return torch.where(q > 0, q * log_q, torch.zeros_like(q)).sum(-1).mean(-1)


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
