"""Type-preserving augmentation: each agent's view of a cell, and the learned augmenter.

Every option changes only what the agents' encoders read during training; the decoders always reconstruct the
real cell and read-outs always encode the real cell.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

from .._constants import NORMALISATION_SCALE

Augmentation = Literal["dropout", "thinning", "knn", "learned"]
AUGMENTATIONS: tuple[str, ...] = ("dropout", "thinning", "knn", "learned")

#: Strength of each option: ``"thinning"``, the expected fraction of counts removed; ``"knn"``, the largest weight of
#: the neighbour; ``"learned"``, the latent perturbation in posterior standard deviations (``"dropout"`` has none:
#: ``input_dropout`` is its strength).
AUGMENTATION_STRENGTH = {"dropout": 0.0, "thinning": 0.5, "knn": 0.3, "learned": 4.0}


def thin_counts(values: torch.Tensor, rows: torch.Tensor, n_cells: int, n_views: int, fraction: float):
    """Binomial thinning of the non-zero counts, independently for each view.

    Each count is kept with probability ``1 - fraction``: ``Binomial(x, 1 - fraction)``, the subsampling of
    reads that a shallower sequencing of the same cell would give.

    Parameters
    ----------
    values
        Non-zero counts ``(nnz,)``.
    rows
        Cell (row) of each count ``(nnz,)``.
    n_cells
        Number of cells ``B``.
    n_views
        Number of independent copies ``A``.
    fraction
        Expected fraction of the counts removed.

    Returns
    -------
    The thinned counts ``(A, nnz)`` (integers stored as floats) and each copy's library size ``(A, B)``.
    """
    counts = values.expand(n_views, -1).contiguous()
    thinned = torch.binomial(counts, torch.full_like(counts, 1.0 - fraction))
    library = thinned.new_zeros((n_views, n_cells)).index_add_(1, rows, thinned)
    return thinned, library


def mix_neighbours(
    x: torch.Tensor, library: torch.Tensor, x_neighbour: torch.Tensor, n_views: int, strength: float
) -> torch.Tensor:
    """Mix each cell's normalised expression with a neighbour's: weight ``w ~ U(0, strength)`` per view and cell.

    Returns ``log1p`` of ``(1 - w) n(x) + w n(x_nn)``, ``(A, B, D)``, with ``n`` the library-normalised counts.
    """
    scale = NORMALISATION_SCALE
    own = x * (scale / library.clamp(min=1.0))
    other = x_neighbour * (scale / x_neighbour.sum(-1, keepdim=True).clamp(min=1.0))
    w = torch.rand((n_views, x.shape[0], 1), device=x.device, dtype=x.dtype) * strength
    return torch.log1p(own + w * (other - own))


class AugmenterModule(nn.Module):
    """Learned augmenter: a small VAE on normalised expression with a type classifier.

    A copy of a cell is the cell plus the change its decoded profile undergoes when the latent moves by
    ``noise`` posterior standard deviations: ``x~ = relu(x + g(mu + noise * sigma * eps) - g(mu))``. The copies
    therefore keep the cell's sparsity and depth and vary along the directions of within-population variability
    the generator has learned. Training (:meth:`loss`) combines, each term passing gradient to the parameters
    it trains: reconstruction and KL (encoder and decoder), the classifier's cross-entropy on real cells
    (classifier) and a type-preservation cross-entropy of the frozen classifier on the copies (encoder and
    decoder through the copies), so that the copies keep their cell's type.

    Parameters
    ----------
    n_input
        Number of genes.
    n_classes
        Number of (pseudo-)types the classifier distinguishes.
    n_hidden
        Width of the hidden layers.
    n_latent
        Dimension of the generator's latent.
    noise
        Perturbation in posterior standard deviations (the augmentation strength).
    """

    def __init__(self, n_input: int, n_classes: int, *, n_hidden: int = 128, n_latent: int = 10, noise: float = 4.0):
        super().__init__()
        self.noise = noise
        self.encoder = nn.Sequential(nn.Linear(n_input, n_hidden), nn.ReLU(), nn.Linear(n_hidden, 2 * n_latent))
        self.decoder = nn.Sequential(nn.Linear(n_latent, n_hidden), nn.ReLU(), nn.Linear(n_hidden, n_input))
        self.classifier = nn.Sequential(nn.Linear(n_input, n_hidden), nn.ReLU(), nn.Linear(n_hidden, n_classes))
        self.register_buffer("trained", torch.tensor(False))

    def encode(self, x_norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and standard deviation of the generator's latent."""
        mean, log_var = self.encoder(x_norm).chunk(2, dim=-1)
        return mean, torch.exp(0.5 * log_var.clamp(-15.0, 15.0))

    def perturb(self, x_norm: torch.Tensor, n_copies: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``n_copies`` augmented copies ``(n, B, D)``, with the latent mean and standard deviation."""
        mean, sd = self.encode(x_norm)
        eps = torch.randn((n_copies, *mean.shape), device=mean.device, dtype=mean.dtype)
        shifted = self.decoder(mean + self.noise * sd * eps)
        centre = self.decoder(mean)
        return F.relu(x_norm + shifted - centre), mean, sd

    @torch.no_grad()
    def augment(self, x_norm: torch.Tensor, n_copies: int) -> torch.Tensor:
        """Make copies for training the agents (no gradient), ``(n_copies, B, D)``."""
        return self.perturb(x_norm, n_copies)[0]

    def loss(self, x_norm: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Compute the augmenter's loss terms on a minibatch (``"loss"`` is their sum)."""
        copies, mean, sd = self.perturb(x_norm, 1)
        z = mean + sd * torch.randn_like(mean)
        reconstruction = (self.decoder(z) - x_norm).pow(2).sum(-1).mean()
        kl = 0.5 * (mean.pow(2) + sd.pow(2) - 1.0 - 2.0 * torch.log(sd)).sum(-1).mean()
        classification = F.cross_entropy(self.classifier(x_norm), labels)
        frozen = {name: p.detach() for name, p in self.classifier.named_parameters()}
        logits = torch.func.functional_call(self.classifier, frozen, (copies[0],))
        preservation = F.cross_entropy(logits, labels)
        return {
            "loss": reconstruction + kl + classification + preservation,
            "reconstruction": reconstruction,
            "kl": kl,
            "classification": classification,
            "preservation": preservation,
        }
