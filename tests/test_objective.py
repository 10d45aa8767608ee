"""The objective's terms, seen through training: what each one does to the fitted posteriors.

Each test trains small models from random weights (the published start, without the Leiden start, so that
nothing but the objective aligns or shapes the agents) on simulated data with three well separated types, and
checks the behaviour the term exists for: the coupling makes the agents' categories agree, its normalisation by the
minibatch variance keeps a strong coupling from collapsing every posterior onto one shared, uniform one, and
the entropy term pulls the posteriors away from overconfidence. The formulas themselves are tested in
``test_module.py``; these tests fail when a term is switched off, unnormalised or of the wrong sign. The last test
fits as a user would with K given (Leiden start, capped coupling weights): the gradient through each category's
minibatch spread must keep more categories than types populated.
"""

import numpy as np
import pytest
import scvi
from sklearn.metrics import adjusted_rand_score

from scmixvae.data import simulate
from scmixvae.model import CplMixVAE
from scmixvae.module import _module

N_TYPES = 3
EPOCHS = 40


@pytest.fixture(scope="module")
def three_types():
    adata = simulate(n_cells=400, n_genes=200, n_types=N_TYPES, type_separation=2.0, seed=0)
    CplMixVAE.setup_anndata(adata)
    return adata


def _fit(adata, seed: int, **options) -> CplMixVAE:
    # the Gaussian likelihood, on which the thresholds below were set and each mutation checked: the terms under
    # test do not depend on it, but the reconstruction's pull they act against does
    scvi.settings.seed = seed
    model = CplMixVAE(adata, n_categories=N_TYPES, n_hidden=32, likelihood="gaussian", **options)
    model.category_init_done_ = True  # random weights: no Leiden start (as a query model starts, marked done)
    model.train(max_epochs=EPOCHS, state_epochs=0, batch_size=64, enable_progress_bar=False)
    return model


def _mean_entropy(model: CplMixVAE) -> float:
    """Mean entropy (nats) of the agents' categorical posteriors over cells and agents."""
    entropies = []
    for agent in range(model.module.n_agents):
        q = model.get_category_probabilities(agent=agent).to_numpy()
        entropies.append(-(q * np.log(np.clip(q, 1e-12, None))).sum(1).mean())
    return float(np.mean(entropies))


def _agreement(model: CplMixVAE) -> float:
    """Fraction of cells on which the two agents give the same category."""
    return float(model.get_agent_agreement().loc["agent0", "agent1"])


def test_the_coupling_makes_agents_from_different_starts_agree(three_types):
    # from independent random weights, an agent's category indices are arbitrary: uncoupled agents that find the
    # same partition give its parts different indices, and only the coupling makes them the same category
    coupled = [_agreement(_fit(three_types, seed)) for seed in (0, 1)]
    uncoupled = [_agreement(_fit(three_types, seed, coupling_weight=0.0)) for seed in (0, 1)]
    assert min(coupled) > 0.95, coupled
    assert min(uncoupled) < 0.9, uncoupled  # the agreement above is the coupling's, not the data's


@pytest.mark.parametrize("seed", [0, 1])
def test_a_strong_coupling_keeps_the_types_and_confident_posteriors(three_types, seed):
    # Dividing by the minibatch standard deviation is what keeps the coupling from being satisfied by one
    # posterior shared by every cell: unnormalised, a strong coupling flattens every posterior to uniform
    # (mean entropy log K) and the types are lost
    model = _fit(three_types, seed, coupling_weight=100.0)
    truth = three_types.obs["type"].to_numpy()
    for agent in range(model.module.n_agents):
        assert adjusted_rand_score(truth, model.predict(agent=agent).to_numpy()) > 0.5
    assert _mean_entropy(model) < 0.95 * np.log(N_TYPES)  # uniform: log K


def _entropy_term_times(monkeypatch, factor: float) -> None:
    """Scale the negative-entropy terms of the loss by ``factor`` (their weight is fixed at the published 1)."""
    negative_entropy = _module.negative_entropy
    monkeypatch.setattr(_module, "negative_entropy", lambda q, log_q: factor * negative_entropy(q, log_q))


def test_the_entropy_term_pulls_posteriors_towards_uniform(three_types, monkeypatch):
    # without the coupling, the entropy term alone acts against the reconstruction's pull towards confident
    # posteriors: weighted heavily it makes them almost uniform; with the wrong sign it would sharpen them
    with monkeypatch.context() as patch:
        _entropy_term_times(patch, 0.0)
        sharp = _mean_entropy(_fit(three_types, 0, coupling_weight=0.0))
    with monkeypatch.context() as patch:
        _entropy_term_times(patch, 10.0)
        flat = _mean_entropy(_fit(three_types, 0, coupling_weight=0.0))
    assert flat > 0.75 * np.log(N_TYPES), (sharp, flat)  # uniform: log K
    assert flat > sharp + 0.25 * np.log(N_TYPES), (sharp, flat)


@pytest.mark.filterwarnings("ignore:7 genes have no counts")
def test_with_k_given_more_categories_than_types_stay_populated_under_the_capped_coupling():
    # With K given the coupling caps each category's weight (model._fit.COUPLING_WEIGHT_CAP) but keeps the gradient
    # through the category's minibatch spread, which is what stops a category from emptying (tutorial 3 starts its
    # pruning from 16 categories of 8 types). Here 14-16 of 16 categories keep cells over seeds 0-4; a cap that also
    # cuts that gradient (torch.minimum on the weight) left 5-6, and a weight with no gradient at all left 1.
    adata = simulate(n_cells=1000, n_genes=300, n_types=8, seed=0)
    CplMixVAE.setup_anndata(adata)
    scvi.settings.seed = 0
    model = CplMixVAE(adata, n_categories=16, input_dropout=0.5)
    model.train(max_epochs=40, state_epochs=0, enable_progress_bar=False)
    assert bool(model.module.coupling_weights.gt(0).all())  # the running mean started: the cap was in play
    counts = np.bincount(model.predict().to_numpy().astype(int), minlength=16)
    assert (counts > 0).sum() >= 12, counts
