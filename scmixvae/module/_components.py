"""Layers whose weights are stacked along an agent axis, so that all agents run in one batched matmul."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F


class StackedLinear(nn.Module):
    """``A`` independent linear layers evaluated together.

    Parameters
    ----------
    n_agents
        Number of independent layers ``A``.
    n_in
        Input features of each layer.
    n_out
        Output features of each layer.
    n_cov
        Width of an optional covariate vector shared by all agents (one-hot batch, categorical
        and continuous covariates), concatenated to the input.

    Notes
    -----
    The input is either shared by all agents, shape ``(B, n_in)`` (one GEMM with the agents' weights
    side by side), or per agent, shape ``(A, B, n_in)`` (one batched matmul). The output is
    ``(A, B, n_out)``.
    """

    def __init__(self, n_agents: int, n_in: int, n_out: int, *, n_cov: int = 0):
        super().__init__()
        self.n_agents, self.n_in, self.n_out, self.n_cov = n_agents, n_in, n_out, n_cov
        bound = 1.0 / math.sqrt(n_in + n_cov)
        self.weight = nn.Parameter(torch.empty(n_agents, n_in, n_out).uniform_(-bound, bound))
        self.weight_cov = (
            nn.Parameter(torch.empty(n_agents, n_cov, n_out).uniform_(-bound, bound)) if n_cov > 0 else None
        )
        self.bias = nn.Parameter(torch.empty(n_agents, 1, n_out).uniform_(-bound, bound))

    def _shared(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # (B, n) @ (n, A * n_out) -> (A, B, n_out)
        a, n, o = weight.shape
        out = x @ weight.permute(1, 0, 2).reshape(n, a * o)
        return out.view(x.shape[0], a, o).transpose(0, 1)

    def forward(self, x: torch.Tensor, cov: torch.Tensor | None = None) -> torch.Tensor:
        """Apply the ``A`` layers to a shared ``(B, n_in)`` or a per-agent ``(A, B, n_in)`` input."""
        if x.dim() == 2:
            out = self._shared(x, self.weight) + self.bias
        else:
            out = torch.baddbmm(self.bias, x, self.weight)
        if self.weight_cov is not None and cov is not None:
            out = out + self._shared(cov, self.weight_cov)
        return out

    def extra_repr(self) -> str:
        return f"n_agents={self.n_agents}, n_in={self.n_in}, n_out={self.n_out}, n_cov={self.n_cov}"


class StackedBatchNorm(nn.Module):
    """Batch normalisation over the cells of each agent separately, input ``(A, B, n)``, without affine parameters.

    ``momentum=None``: the running statistics are the cumulative average of the minibatches' statistics since
    ``n_cells_tracked`` was last set to 0, each weighted by its number of cells (as
    :class:`torch.nn.BatchNorm1d` with ``momentum=None``, which weighs minibatches equally).
    """

    def __init__(self, n_agents: int, n_features: int, *, momentum: float | None = 0.1, eps=1e-5):
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.n_cells_tracked = 0  # cells averaged so far with momentum=None
        self.register_buffer("running_mean", torch.zeros(n_agents, 1, n_features))
        self.register_buffer("running_var", torch.ones(n_agents, 1, n_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise ``x`` with batch statistics (training, more than one cell) or running statistics."""
        if self.training and x.shape[1] > 1:
            var, mean = torch.var_mean(x, dim=1, keepdim=True, correction=0)
            with torch.no_grad():
                n = x.shape[1]
                dtype = self.running_mean.dtype  # float32 buffers under mixed precision
                momentum = self.momentum
                if momentum is None:  # cumulative average: the first minibatch replaces the statistics
                    self.n_cells_tracked += n
                    momentum = n / self.n_cells_tracked
                self.running_mean.lerp_(mean.to(dtype), momentum)
                self.running_var.lerp_((var * n / (n - 1)).to(dtype), momentum)
        else:
            mean, var = self.running_mean, self.running_var
        return (x - mean) * torch.rsqrt(var + self.eps)


class StackedMLP(nn.Module):
    """``A`` independent multilayer perceptrons (Linear → ReLU per hidden layer), evaluated together.

    Parameters
    ----------
    n_agents
        Number of agents.
    n_in
        Input width.
    n_hidden
        Width of each hidden layer.
    n_layers
        Number of hidden layers (at least 1).
    n_cov
        Width of the shared covariate vector.
    inject_covariates
        Whether the covariates enter every hidden layer (scVI's decoder) or the first only.
    """

    def __init__(
        self,
        n_agents: int,
        n_in: int,
        n_hidden: int,
        n_layers: int,
        *,
        n_cov: int = 0,
        inject_covariates: bool = False,
    ):
        super().__init__()
        dims = [n_in] + [n_hidden] * n_layers
        self.layers = nn.ModuleList(
            StackedLinear(n_agents, d_in, d_out, n_cov=n_cov if (i == 0 or inject_covariates) else 0)
            for i, (d_in, d_out) in enumerate(itertools.pairwise(dims))
        )

    def forward(self, x: torch.Tensor, cov: torch.Tensor | None = None) -> torch.Tensor:
        """Apply the layers; ``x`` is ``(B, n_in)`` (shared) or ``(A, B, n_in)``."""
        for layer in self.layers:
            x = F.relu(layer(x, cov))
        return x


def recompute_norm_statistics(module: nn.Module, batches: Iterable[Any], forward: Callable[[Any], Any]) -> None:
    """Recompute the running statistics of each :class:`StackedBatchNorm` in ``module`` over ``batches``.

    One pass without gradients, with the module in evaluation mode except its norm layers (training mode,
    cumulative average: ``momentum=None``), so that what ``forward`` encodes (e.g. the real cells, where training
    normalised augmented views) sets the statistics that evaluation-mode read-outs use. Each norm layer's momentum
    and every submodule's mode are restored afterwards. A layer that sees no minibatch of two or more cells keeps its
    statistics (the cumulative average starts with the first one it sees), and so does a layer whose statistics are
    frozen (momentum 0, as a query model's reference statistics).
    """
    norms = [m for m in module.modules() if isinstance(m, StackedBatchNorm) and m.momentum != 0]
    if not norms:
        return
    modes = {m: m.training for m in module.modules()}
    momenta = [norm.momentum for norm in norms]
    try:
        module.eval()
        for norm in norms:
            norm.train()
            norm.momentum, norm.n_cells_tracked = None, 0
        with torch.no_grad():
            for batch in batches:
                forward(batch)
    finally:
        for norm, momentum in zip(norms, momenta, strict=True):
            norm.momentum = momentum
        for m, training in modes.items():
            m.training = training
