"""Loss terms of the coupled mixture VAE (see the user guide for the formulas)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

#: Counts up to this value take ``lgamma(x + theta) - lgamma(theta)`` and its derivative from a per-gene table.
NB_TABLE_COUNTS = 16


def nonzero_indices(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row, column and flat (row-major) indices of the non-zero entries of ``x`` ``(B, D)``, in row-major order.

    Rows and columns are ``x.nonzero(as_tuple=True)``; searching a boolean mask is about twice as fast on the
    CPU as searching the floats themselves. The flat indices ``rows * D + cols`` index ``x.reshape(-1)``.
    """
    rows, cols = (x != 0).nonzero(as_tuple=True)
    return rows, cols, rows * x.shape[-1] + cols


def csr_nonzero(x: torch.Tensor) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """Non-zero entries of a sparse CSR minibatch ``(B, D)`` and their values.

    ``(rows, cols, flat)`` as :func:`nonzero_indices` gives them (grouped by row), read from the CSR structure
    itself, which costs a fraction of searching a dense minibatch.
    """
    crow = x.crow_indices().long()
    cols = x.col_indices().long()
    rows = torch.repeat_interleave(torch.arange(x.shape[0], device=x.device), crow.diff())
    return (rows, cols, rows * x.shape[-1] + cols), x.values()


def with_flat_index(nonzero: tuple[torch.Tensor, ...], n_cols: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(rows, cols, flat)`` from the output of :func:`nonzero_indices` or from ``(rows, cols)`` alone."""
    if len(nonzero) == 3:
        return nonzero[0], nonzero[1], nonzero[2]
    rows, cols = nonzero
    return rows, cols, rows * n_cols + cols


def nb_log_likelihood(
    x: torch.Tensor,
    log_mu: torch.Tensor,
    theta: torch.Tensor,
    *,
    nonzero: tuple[torch.Tensor, torch.Tensor] | None = None,
    log_library: torch.Tensor | None = None,
    logits: bool = False,
    counts: torch.Tensor | None = None,
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
        Row and column indices of the non-zero counts (``x.nonzero(as_tuple=True)``, in row-major order),
        optionally with their flat indices (:func:`nonzero_indices`); computed when not given.
    log_library
        Optional log library size of each cell ``(B, 1)``: the means are then ``exp(log_mu + log_library)``,
        without a dense ``(A, B, D)`` sum of the two being formed (``log_mu`` is then the decoder's log
        scale).
    logits
        ``log_mu`` holds the decoder's unnormalised outputs: the log scale is their ``log_softmax`` over genes,
        evaluated inside the same autograd node (no separate ``(A, B, D)`` log-softmax tensor nor autograd node).
    counts
        The values of ``x`` at ``nonzero``, when known (then ``x`` is only read for its shape and may be a sparse
        CSR tensor: :func:`csr_nonzero`).

    Returns
    -------
    Log-likelihood per agent and cell, ``(A, B)``; equal to
    ``scvi.distributions.NegativeBinomial(mu, theta).log_prob(x).sum(-1)``.

    Notes
    -----
    With ``L = log(theta + mu)`` the log-likelihood of one entry is
    ``theta log theta - (theta + x) L + x log mu + lgamma(x + theta) - lgamma(theta) - lgamma(x + 1)``; the
    log-gamma terms vanish at ``x = 0``, and so does ``x log mu``. With a per-gene ``theta`` (``(A, 1, D)``) the
    whole computation is one autograd node (:class:`NBLogLikelihood`) that makes two transcendental passes over
    the dense ``(A, B, D)`` means (an ``exp`` and a ``log`` forward, one ``exp`` backward) and reduces over genes
    with matrix products. The terms in ``x`` touch the non-zero counts only: for counts up to :data:`NB_TABLE_COUNTS`,
    ``lgamma(x + theta) - lgamma(theta) = sum_{j<x} log(theta + j)`` and its derivative
    ``sum_{j<x} 1 / (theta + j)`` come from a small ``(A, D, 17)`` table of cumulative sums, so no log-gamma
    or digamma is evaluated per entry except for the few larger counts. A per-cell ``theta`` (gene-batch
    dispersion) takes the plain autograd path (:func:`nb_log_likelihood_reference`).
    """
    rows, cols, flat = nonzero_indices(x) if nonzero is None else with_flat_index(nonzero, x.shape[-1])
    if theta.dim() != 3 or theta.shape[1] != 1:
        log_mu = torch.log_softmax(log_mu, dim=-1) if logits else log_mu
        log_mu = log_mu if log_library is None else log_mu + log_library
        x = x.to_dense() if x.layout != torch.strided else x
        return nb_log_likelihood_reference(x, log_mu, theta, nonzero=(rows, cols))
    if counts is None:
        counts = x.reshape(-1).index_select(0, flat)
    # mixed precision: the likelihood is summed over thousands of genes, so it is computed in float32
    with torch.autocast(log_mu.device.type, enabled=False):
        log_library = None if log_library is None else _at_least_float32(log_library)
        return NBLogLikelihood.apply(
            _at_least_float32(counts),
            _at_least_float32(log_mu),
            _at_least_float32(theta),
            rows,
            cols,
            flat,
            log_library,
            logits,
        )


def nb_log_likelihood_dense(
    x: torch.Tensor, log_mu: torch.Tensor, theta: torch.Tensor, *, log_library: torch.Tensor | None = None
) -> torch.Tensor:
    """Negative binomial log-likelihood summed over genes, computed densely with plain autograd.

    Same value as :func:`nb_log_likelihood`, ``(A, B)``, without finding the non-zero counts: on an accelerator
    that search (``nonzero``) makes the host wait for the device at every step, while dense log-gamma terms
    cost little there. Computed in float32 under mixed precision.
    """
    with torch.autocast(log_mu.device.type, enabled=False):
        x, log_mu, theta = _at_least_float32(x), _at_least_float32(log_mu), _at_least_float32(theta)
        if log_library is not None:
            log_mu = log_mu + _at_least_float32(log_library)
        log_theta = torch.log(theta)
        log_theta_mu = torch.logaddexp(log_theta, log_mu)
        ll = (
            theta * (log_theta - log_theta_mu)
            + x * (log_mu - log_theta_mu)
            + torch.lgamma(x + theta)
            - torch.lgamma(theta)
            - torch.lgamma(x + 1.0)
        )
        return ll.sum(-1)


def _at_least_float32(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def nb_log_likelihood_reference(
    x: torch.Tensor,
    log_mu: torch.Tensor,
    theta: torch.Tensor,
    *,
    nonzero: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """:func:`nb_log_likelihood` in plain autograd operations, for any ``theta`` broadcastable to ``log_mu``.

    The log-gamma terms and ``x log(mu / (theta + mu))`` are evaluated on the non-zero counts only.
    """
    log_theta = torch.log(theta)
    log_theta_mu = torch.logaddexp(log_theta, log_mu)
    ll = (theta * (log_theta - log_theta_mu)).sum(-1)
    rows, cols = nonzero_indices(x)[:2] if nonzero is None else nonzero[:2]
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


def _gamma_ratio_tables(theta: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``lgamma(theta + j) - lgamma(theta)`` and its derivative in ``theta`` for ``j = 0..n``, ``(A, D, n + 1)``.

    ``theta`` is ``(A, D)``; both are cumulative sums of ``log(theta + i)`` and ``1 / (theta + i)``, ``i < j``.
    """
    shifted = theta.unsqueeze(-1) + torch.arange(n, device=theta.device, dtype=theta.dtype)
    zero = theta.new_zeros((*theta.shape, 1))
    values = torch.cat([zero, shifted.log().cumsum(-1)], dim=-1)
    derivatives = torch.cat([zero, shifted.reciprocal().cumsum(-1)], dim=-1)
    return values, derivatives


class NBLogLikelihood(torch.autograd.Function):
    """Autograd node of :func:`nb_log_likelihood` for a per-gene ``theta`` ``(A, 1, D)``.

    Forward: ``mu`` and ``L = log(theta + mu)`` (both kept for backward), reductions over genes of the dense
    terms with a matrix product and of the terms in ``x`` over the non-zero counts. Backward, with
    ``p = theta / (theta + mu)`` (formed densely as ``1 - p = mu / (theta + mu)``, so the backward evaluates
    no exponential): ``d/d log_mu = (theta + x) p - theta`` and
    ``d/d theta = log theta + 1 - L - (theta + x) p / theta + [x > 0] (digamma(x + theta) - digamma(theta))``,
    summed over cells with the upstream gradient as weights (a batched matrix product). The optional log
    library size enters the means as a per-cell offset; its gradient is the sum of ``d/d log_mu`` over agents
    and genes. With ``logits=True`` the input is the decoder's output ``z`` and ``log mu = log_softmax(z)`` (plus
    the offset): the forward's ``exp`` pass yields the softmax (``mu`` over the library size), and the backward
    maps ``g = d/d log_mu`` to ``d/d z = g - softmax(z) sum(g)``, so no log-softmax tensor is formed forward.
    """

    @staticmethod
    def forward(ctx, counts, log_mu, theta, rows, cols, flat, log_library=None, logits=False):
        n_agents = theta.shape[0]
        log_theta = theta.log()
        log_norm = library = None
        if log_library is not None:
            library = log_library.exp()  # (B, 1)
        if logits:  # log_mu holds logits: mu = softmax(logits) * library, log mu = logits - log_norm (+ log library)
            top = log_mu.detach().amax(-1, keepdim=True)
            mu = (log_mu - top).exp_()
            total = mu.sum(-1, keepdim=True)
            log_norm = top + total.log()  # (A, B, 1)
            mu.mul_(total.reciprocal_() if library is None else library / total)
        else:
            mu = log_mu.exp()
            if library is not None:
                mu.mul_(library)
        big_l = torch.add(mu, theta).log_()  # log(theta + mu), (A, B, D); mu is kept for the backward
        theta_t = theta.transpose(1, 2)  # (A, D, 1)
        ll = (theta * log_theta).sum(-1) - torch.bmm(big_l, theta_t).squeeze(-1)
        # terms in x on the non-zero counts: x (log mu - L), and the log-gamma terms (a table lookup for small
        # counts, lgamma for the rest)
        n_cells = log_mu.shape[1]
        log_mu_nz = log_mu.reshape(n_agents, -1).index_select(1, flat)
        if log_norm is not None:
            log_mu_nz = log_mu_nz - log_norm.reshape(n_agents, -1).index_select(1, rows)
        if log_library is not None:
            log_mu_nz = log_mu_nz + log_library.reshape(-1).index_select(0, rows)
        x_terms = counts * (log_mu_nz - big_l.reshape(n_agents, -1).index_select(1, flat))  # (A, nnz)
        small_counts = counts.long().clamp_(max=NB_TABLE_COUNTS)
        index = cols * (NB_TABLE_COUNTS + 1) + small_counts
        theta_2d = theta.detach().squeeze(1)
        values, derivatives = _gamma_ratio_tables(theta_2d, NB_TABLE_COUNTS)
        log_factorial = torch.lgamma(torch.arange(1, NB_TABLE_COUNTS + 2, device=counts.device, dtype=counts.dtype))
        lg = (values - log_factorial).view(n_agents, -1).index_select(1, index)  # (A, nnz)
        big = (counts > NB_TABLE_COUNTS).nonzero().squeeze(1)
        dg = derivatives.view(n_agents, -1).index_select(1, index) if ctx.needs_input_grad[2] else None
        if big.numel():
            big_counts = counts[big]
            theta_big = theta_2d.index_select(1, cols[big])
            lg.index_copy_(
                1, big, torch.lgamma(big_counts + theta_big) - torch.lgamma(theta_big) - torch.lgamma(big_counts + 1)
            )
            if dg is not None:
                dg.index_copy_(1, big, torch.digamma(big_counts + theta_big) - torch.digamma(theta_big))
        lengths = torch.bincount(rows, minlength=n_cells).expand(n_agents, -1).contiguous()
        ll = ll + torch.segment_reduce(x_terms.add_(lg), "sum", lengths=lengths, axis=1)
        ctx.logits = bool(logits)
        ctx.save_for_backward(counts, theta, log_theta, big_l, mu, rows, cols, flat, dg, library)
        return ll

    @staticmethod
    def backward(ctx, grad):
        with torch.autocast(grad.device.type, enabled=False):  # float32, as the forward
            return NBLogLikelihood._backward(ctx, _at_least_float32(grad))

    @staticmethod
    def _backward(ctx, grad):
        counts, theta, log_theta, big_l, mu, rows, cols, flat, dg, library = ctx.saved_tensors
        grad_log_mu = grad_theta = grad_log_library = None
        n_agents = theta.shape[0]
        # t = 1 - p = mu / (theta + mu): no transcendental pass (the forward kept mu); p on the non-zero counts
        t = torch.add(mu, theta)
        t = torch.div(mu, t, out=t)
        theta_nz = theta.squeeze(1).index_select(1, cols)
        mu_nz = mu.view(n_agents, -1).index_select(1, flat)
        x_p = counts * theta_nz / (theta_nz + mu_nz)  # x p, (A, nnz)
        if ctx.needs_input_grad[2]:
            # with u = (theta + x) p = theta (1 - t) + x p, the dense part of
            # sum_cells g (log theta + 1 - L - u / theta) is sum_cells g (log theta - L + t); the terms in x
            # (-x p / theta and the digamma difference) are summed over the non-zero counts in one scatter
            g = grad.unsqueeze(1)  # (A, 1, B)
            g_sum = grad.sum(-1, keepdim=True).unsqueeze(-1)  # (A, 1, 1)
            grad_theta = log_theta * g_sum - torch.bmm(g, big_l) + torch.bmm(g, t)
            sparse_terms = grad.index_select(1, rows) * (dg - x_p / theta_nz)
            grad_theta = grad_theta + torch.zeros_like(theta).squeeze(1).index_add_(1, cols, sparse_terms)[:, None]
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[6]:
            # d/d log mu = u - theta = x p - theta t, times the upstream gradient
            grad_log_mu = t.mul_(-theta)
            grad_log_mu.view(n_agents, -1).index_add_(1, flat, x_p)
            grad_log_mu.mul_(grad.unsqueeze(-1))
            if ctx.needs_input_grad[6]:
                grad_log_library = grad_log_mu.sum((0, 2)).unsqueeze(-1)
            if not ctx.needs_input_grad[1]:
                grad_log_mu = None
            elif ctx.logits:  # through the log-softmax: g - softmax * sum(g), softmax = mu / library
                weight = grad_log_mu.sum(-1, keepdim=True)
                weight = weight if library is None else weight / library
                grad_log_mu.addcmul_(mu, weight, value=-1.0)
        return None, grad_log_mu, grad_theta, None, None, None, grad_log_library, None


class _HalfSquaredDistance(torch.autograd.Function):
    """``-0.5 * sum_genes (mean - x)^2`` in one node: the difference formed once, kept for the backward pass.

    Plain autograd makes four passes over the ``(A, B, D)`` tensors (difference, square, and two in the
    backward pass); here the forward forms the difference and reduces it with a dot product, and the backward
    scales it once. Computed in at least float32 (mixed precision).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
        diff = torch.sub(_at_least_float32(mean), _at_least_float32(x))
        ctx.save_for_backward(diff)
        ctx.x_shape = x.shape
        return torch.linalg.vecdot(diff, diff).mul_(-0.5)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (diff,) = ctx.saved_tensors
        grad_mean = diff * grad.neg().unsqueeze(-1)
        grad_x = None
        if ctx.needs_input_grad[0]:  # the target broadcast over the agents: sum their gradients
            grad_x = grad_mean.neg().sum_to_size(ctx.x_shape)
        return grad_x, grad_mean if ctx.needs_input_grad[1] else None


def gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """Unit-variance Gaussian log-likelihood summed over genes (the published squared-error loss).

    ``x`` ``(B, D)`` or ``(A, B, D)``, ``mean`` ``(A, B, D)``; returns ``(A, B)``.
    """
    return _HalfSquaredDistance.apply(x, mean) - 0.5 * x.shape[-1] * math.log(2 * math.pi)


def kl_normal_standard(mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """``KL(N(mean, var) || N(0, I))`` summed over the last axis."""
    return 0.5 * (var + mean.pow(2) - 1.0 - torch.log(var)).sum(-1)


def negative_entropy(q: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """``mean_i sum_k q log q`` per agent; ``q`` is ``(A, B, K)``, returns ``(A,)``.

    Masked categories (``q = 0``, ``log_q = -inf``) contribute 0, and so does their gradient: ``log_q`` is
    replaced before the product, since ``torch.where`` on ``q * log_q`` would back-propagate ``0 * inf = NaN``.
    """
    return (q * torch.where(q > 0, log_q, torch.zeros_like(log_q))).sum(-1).mean(-1)


def category_weights(q: torch.Tensor, var_eps: float = 1e-4, weight_cap: torch.Tensor | None = None) -> torch.Tensor:
    """Compute the coupling's weight of each category, ``(Var_batch[q] + var_eps)^(-1/2)``, shape ``(A, 1, K)``.

    ``weight_cap`` (broadcastable to ``(A, 1, K)``; entries that are not positive cap nothing) caps the weight's
    value: a weight of at most ``c`` is a spread of at least ``c^-2 - var_eps``. The spread is floored there while
    its gradient stays the minibatch spread's own (taken at the floor), which keeps a category from emptying.
    """
    var = q.var(dim=1, keepdim=True, correction=0)
    if weight_cap is not None:
        cap = weight_cap.to(var.dtype)
        floor = torch.where(cap > 0, cap.pow(-2) - var_eps, torch.zeros_like(cap)).clamp(min=0)
        var = var + (torch.maximum(var, floor) - var).detach()
    return torch.rsqrt(var + var_eps)


def coupling_distance(
    q: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps: float = 1e-8,
    var_eps: float = 1e-4,
    kind: str = "aitchison",
    weight_cap: torch.Tensor | None = None,
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
    weight_cap
        Largest weight ``r`` of each category (``None``: no cap); see :func:`category_weights`.

    Returns
    -------
    ``(A, A)`` matrix of mean (over cells) distances; only the upper triangle is used.
    """
    log_q = torch.log(q + eps)
    if kind == "clr":
        n_active = mask.sum().clamp(min=1)
        centre = (log_q * mask).sum(-1, keepdim=True) / n_active
        log_q = log_q - centre
    z = log_q * category_weights(q, var_eps, weight_cap) * mask
    diff = z.unsqueeze(0) - z.unsqueeze(1)
    return diff.pow(2).sum(-1).mean(-1)


def category_condition_discrepancy(q: torch.Tensor, condition: torch.Tensor, n_conditions: int) -> torch.Tensor:
    """How much the category proportions differ between conditions in a minibatch, per agent.

    For each pair of conditions ``g, h`` with at least two cells each, a chi-square-like distance between their
    mean posteriors, ``sum_k (m_gk - m_hk)^2 / m_k`` with ``m_k`` the mean posterior of the minibatch's cells of
    known condition (held constant for the gradient), so that a type split between conditions costs in proportion
    to its size. The squares are estimated without bias (``m_gk^2`` leaves out each cell's product with itself): a
    plug-in estimate would be biased upwards by the sampling noise of the proportions, which is smaller with fewer
    categories, and would so reward merging types. Averaged over the pairs of conditions present.

    Parameters
    ----------
    q
        Posteriors ``(A, B, K)``; masked categories carry zero mass.
    condition
        Integer condition code per cell ``(B,)`` or ``(B, 1)``; cells with a negative code (unknown) are left out.
    n_conditions
        Number of condition codes.

    Returns
    -------
    ``(A,)`` discrepancy: 0 in expectation when every condition has the same proportions (it can be slightly
    negative, being unbiased), about ``4 p`` when a type of proportion ``p`` is split into one category per
    condition between two conditions.
    """
    g = condition_indicator(condition, n_conditions, q.dtype)  # (B, G)
    known = g.sum(-1)  # (B,)
    n = g.sum(0)  # (G,)
    mean_q = torch.einsum("b,abk->ak", known, q.detach()) / known.sum().clamp(min=1)
    weight = 1.0 / mean_q.clamp(min=1e-3)  # (A, K)
    sums = torch.einsum("bg,abk->agk", g, q)  # (A, G, K)
    self_products = torch.einsum("bg,abk->agk", g, q.pow(2))  # (A, G, K)
    present = n >= 2
    n_safe = n.clamp(min=2)
    means = sums / n_safe[:, None]
    square = (sums.pow(2) - self_products) / (n_safe * (n_safe - 1))[:, None]  # unbiased m_gk^2, (A, G, K)
    # sum_k w_k (m_gk^2 + m_hk^2 - 2 m_gk m_hk) for every pair (g, h), (A, G, G)
    weighted_square = (square * weight[:, None]).sum(-1)
    cross = (means * weight[:, None]) @ means.transpose(-1, -2)
    dist = weighted_square[:, :, None] + weighted_square[:, None, :] - 2 * cross
    pairs = torch.triu(present[:, None] & present[None, :], diagonal=1).to(q.dtype)  # (G, G)
    return (dist * pairs).sum((-2, -1)) / pairs.sum().clamp(min=1)


def condition_indicator(condition: torch.Tensor, n_conditions: int, dtype: torch.dtype) -> torch.Tensor:
    """One-hot condition of each cell ``(B, G)`` from codes ``(B,)`` or ``(B, 1)``.

    A negative code (unknown: a query or new data without the condition) gives a row of zeros: the cell takes no part.
    """
    condition = condition.reshape(-1).long()
    known = (condition >= 0).to(dtype)
    return F.one_hot(condition.clamp(min=0), n_conditions).to(dtype) * known.unsqueeze(-1)


def condition_category_means(
    q: torch.Tensor, condition: torch.Tensor, n_conditions: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean posterior ``(A, G, K)`` of each condition's cells in a minibatch, and their numbers ``(G,)``.

    ``q`` holds the posteriors ``(A, B, K)``; ``condition`` and ``n_conditions`` are as in
    :func:`category_condition_discrepancy`. A condition without cells has means of zero.
    """
    g = condition_indicator(condition, n_conditions, q.dtype)
    n = g.sum(0)
    return torch.einsum("bg,abk->agk", g, q) / n.clamp(min=1)[:, None], n


def category_condition_divergence(means: torch.Tensor, shares: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """How far each condition's category proportions are from missing a category that the others hold, per agent.

    ``sum_g pi_g KL(m || r_g)``, with ``r_g`` the category proportions among the cells of condition ``g``, ``pi_g``
    the condition's share of the cells and ``m = sum_g pi_g r_g`` the overall proportions. For proportions close
    to each other it is about half a chi-square distance, so a change of composition between conditions costs
    little; a category that condition ``g`` lacks while the others hold it costs about ``pi_g m_k log(1 / r_gk)``,
    without bound as ``r_gk`` goes to 0 (``r`` is clamped at ``eps``): the cost of a type split into one category per
    condition.

    Parameters
    ----------
    means
        Category proportions of each condition ``(A, G, K)``; masked categories carry zero mass.
    shares
        Weight of each condition ``(G,)``, summing to 1; a condition of weight 0 takes no part.
    eps
        Floor of the proportions inside the logarithms.

    Returns
    -------
    ``(A,)`` divergence, 0 when every condition has the same proportions.
    """
    overall = torch.einsum("g,agk->ak", shares, means)
    cross = torch.einsum("g,agk->ak", shares, torch.log(means.clamp(min=eps)))
    return (overall * (torch.log(overall.clamp(min=eps)) - cross)).sum(-1)
