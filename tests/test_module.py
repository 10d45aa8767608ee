import math

import pytest
import torch
from scvi import REGISTRY_KEYS
from scvi.distributions import NegativeBinomial

from scmixvae.module import (
    CovariateLayout,
    CplMixVAEModule,
    StackedBatchNorm,
    StackedLinear,
    _module,
    check_temperature,
)
from scmixvae.module._losses import (
    category_condition_discrepancy,
    category_condition_divergence,
    condition_category_means,
    coupling_distance,
    gaussian_log_likelihood,
    nb_log_likelihood,
    negative_entropy,
    nonzero_indices,
)


@pytest.fixture
def counts():
    gen = torch.Generator().manual_seed(0)
    x = torch.poisson(torch.rand(32, 50, generator=gen) * 3, generator=gen)
    x[:, 0] += 1  # no empty cell
    return x


def test_stacked_linear_matches_independent_layers():
    torch.manual_seed(0)
    layer = StackedLinear(3, 5, 4, n_cov=2)
    x = torch.randn(7, 5)
    cov = torch.randn(7, 2)
    shared = layer(x, cov)
    per_agent = layer(x.expand(3, 7, 5).contiguous(), cov)
    assert shared.shape == (3, 7, 4)
    for a in range(3):
        expected = x @ layer.weight[a] + cov @ layer.weight_cov[a] + layer.bias[a]
        torch.testing.assert_close(shared[a], expected)
        torch.testing.assert_close(per_agent[a], expected)


def test_stacked_batchnorm_normalises_each_agent_and_tracks_running_stats():
    bn = StackedBatchNorm(2, 3)
    x = torch.randn(2, 100, 3) * torch.tensor([1.0, 5.0]).view(2, 1, 1) + 3
    out = bn(x)
    torch.testing.assert_close(out.mean(1), torch.zeros(2, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.var(1, correction=0), torch.ones(2, 3), atol=1e-3, rtol=0)
    assert torch.all(bn.running_mean > 0.2)
    bn.eval()
    single = bn(x[:, :1])
    assert single.shape == (2, 1, 3)


def test_nb_log_likelihood_matches_scvi(counts):
    log_mu = torch.randn(2, *counts.shape)
    theta = torch.rand(2, 1, counts.shape[1]) * 5 + 0.1
    ours = nb_log_likelihood(counts, log_mu, theta)
    ref = NegativeBinomial(mu=log_mu.exp(), theta=theta.expand_as(log_mu)).log_prob(counts).sum(-1)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-3)


def test_gaussian_log_likelihood_is_unit_variance_normal_with_its_gradients():
    x, mean = torch.randn(4, 6), torch.randn(2, 4, 6)
    ref = torch.distributions.Normal(mean, 1.0).log_prob(x).sum(-1)
    torch.testing.assert_close(gaussian_log_likelihood(x, mean), ref)
    # the fused node's gradients against autograd, in float64, for a target shared by the agents or not
    for x_shape in [(4, 6), (2, 4, 6)]:
        x64 = torch.randn(*x_shape, dtype=torch.float64, requires_grad=True)
        mean64 = torch.randn(2, 4, 6, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(gaussian_log_likelihood, (x64, mean64))
    # mixed precision: computed in float32, gradient returned in the input's dtype
    half = mean.bfloat16().requires_grad_()
    out = gaussian_log_likelihood(x, half)
    assert out.dtype == torch.float32
    out.sum().backward()
    assert half.grad.dtype == torch.bfloat16


def test_coupling_distance_zero_for_identical_posteriors_and_ignores_masked_categories():
    q = torch.softmax(torch.randn(1, 16, 4), -1).expand(2, 16, 4)
    mask = torch.ones(4, dtype=torch.bool)
    dist = coupling_distance(q, mask)
    assert dist.shape == (2, 2)
    assert dist[0, 1].item() == pytest.approx(0.0, abs=1e-6)
    q2 = torch.stack([q[0], torch.softmax(torch.randn(16, 4), -1)])
    assert coupling_distance(q2, mask)[0, 1] > 0
    # a masked category with differing values contributes nothing
    q3 = q2.clone()
    q3[1, :, 3] = q3[0, :, 3]
    mask3 = torch.tensor([True, True, True, False])
    q4 = q3.clone()
    q4[1, :, 3] = 0.5
    torch.testing.assert_close(coupling_distance(q3, mask3), coupling_distance(q4, mask3))
    assert coupling_distance(q2, mask, kind="clr")[0, 1] > 0


def test_negative_entropy_of_uniform_is_minus_log_k():
    q = torch.full((2, 5, 4), 0.25)
    torch.testing.assert_close(negative_entropy(q, q.log()), torch.full((2,), -math.log(4)))


def _tensors(x, batch=None):
    t = {REGISTRY_KEYS.X_KEY: x}
    if batch is not None:
        t[REGISTRY_KEYS.BATCH_KEY] = batch
    return t


@pytest.mark.parametrize("likelihood", ["nb", "zinb", "gaussian"])
def test_forward_shapes_and_every_parameter_gets_gradient(counts, likelihood):
    torch.manual_seed(0)
    module = CplMixVAEModule(counts.shape[1], n_agents=3, n_categories=4, n_state=2, likelihood=likelihood)
    inference, _, loss = module(_tensors(counts))
    assert inference["q"].shape == (3, 32, 4)
    assert inference["qs_m"].shape == (3, 32, 2)
    torch.testing.assert_close(inference["q"].sum(-1), torch.ones(3, 32))
    loss.loss.backward()
    for name, param in module.named_parameters():
        assert param.grad is not None and torch.any(param.grad != 0), name
    metrics = set(loss.extra_metrics)
    assert {"coupling", "agreement", "reconstruction_agent2", "kl_agent0", "neg_entropy_agent1"} <= metrics


def test_agents_see_different_views_in_training_and_the_real_cell_in_eval(counts):
    module = CplMixVAEModule(counts.shape[1], n_agents=2, input_dropout=0.5)
    library = counts.sum(-1, keepdim=True)
    x_norm = module.normalise(counts, library)
    nonzero = counts.nonzero(as_tuple=True)
    views = module._augment(counts, x_norm, library, nonzero)
    assert views.shape == (2, *counts.shape)
    assert not torch.equal(views[0], views[1])
    assert torch.all(views[:, counts == 0] == 0)
    kept = views[0][views[0] != 0]
    torch.testing.assert_close(kept, (x_norm * 2)[views[0] != 0])
    module.eval()
    assert module._augment(counts, x_norm, library, nonzero) is x_norm


@pytest.mark.parametrize("augmentation", ["dropout", "thinning"])
def test_state_encoder_reads_the_real_cell(counts, augmentation):
    torch.manual_seed(0)
    module = CplMixVAEModule(counts.shape[1], n_agents=2, n_categories=3, augmentation=augmentation)
    module.train()
    first = module.inference(counts)
    second = module.inference(counts)
    # the categorical trunk sees a fresh augmented view at every call, the state encoder the real cell
    assert not torch.equal(first["h"], second["h"])
    torch.testing.assert_close(first["hs"], second["hs"])
    assert first["hs"].shape == (2, counts.shape[0], 32)  # 32 units
    assert module.state_head.weight.shape[1] == 32 + 3


@pytest.mark.parametrize(
    "removed", ["state_encoder", "coupling", "category_state_interaction", "augmentation_strength", "condition_weight"]
)
def test_module_refuses_removed_options(counts, removed):
    with pytest.raises(TypeError, match=f"unexpected keyword argument '{removed}'"):
        CplMixVAEModule(counts.shape[1], **{removed: None})


def test_decoder_reads_the_category_and_a_state_copy_per_category(counts):
    module = CplMixVAEModule(counts.shape[1], n_categories=3, n_state=2)
    c = torch.tensor([[[0.0, 1.0, 0.0]]])
    s = torch.tensor([[[0.5, -2.0]]])
    torch.testing.assert_close(module.decoder_input(c, s), torch.tensor([[[0.0, 1.0, 0.0, 0, 0, 0.5, -2.0, 0, 0]]]))
    assert module.decoder.layers[0].weight.shape[1] == 3 * (1 + 2)


def test_normalisation_on_the_nonzero_counts_equals_the_dense_one(counts):
    library = counts.sum(-1, keepdim=True)
    nonzero = counts.nonzero(as_tuple=True)
    x_norm, values = CplMixVAEModule.normalise_nonzero(counts, library, nonzero)
    expected = CplMixVAEModule.normalise(counts, library)
    torch.testing.assert_close(x_norm, expected, rtol=0, atol=0)
    torch.testing.assert_close(values, expected[nonzero], rtol=0, atol=0)
    rows, cols, flat = nonzero_indices(counts)  # the search the training step runs, with the flat indices
    assert torch.equal(rows, nonzero[0]) and torch.equal(cols, nonzero[1])
    assert torch.equal(counts.reshape(-1)[flat], counts[nonzero])
    torch.testing.assert_close(CplMixVAEModule.normalise_nonzero(counts, library, (rows, cols, flat))[0], x_norm)
    # the views made from the known non-zero values equal those that look them up
    module = CplMixVAEModule(counts.shape[1], n_agents=2, input_dropout=0.5)
    torch.manual_seed(3)
    given = module._augment(counts, x_norm, library, nonzero, x_norm_nonzero=values)
    torch.manual_seed(3)
    looked_up = module._augment(counts, x_norm, library, nonzero)
    torch.testing.assert_close(given, looked_up, rtol=0, atol=0)


def test_dense_dropout_views_without_nonzero_indices(counts):
    # the accelerator path: no non-zero search, one dense mask per agent; zeros stay zero, kept entries rescaled
    torch.manual_seed(0)
    module = CplMixVAEModule(counts.shape[1], n_agents=2, input_dropout=0.5)
    library = counts.sum(-1, keepdim=True)
    x_norm = module.normalise(counts, library)
    views = module._augment(counts, x_norm, library, None)
    assert views.shape == (2, *counts.shape)
    assert not torch.equal(views[0], views[1])
    assert torch.all(views[:, counts == 0] == 0)
    kept = views != 0
    torch.testing.assert_close(views[kept], (x_norm * 2).expand(2, -1, -1)[kept])
    assert 0.35 < kept[:, counts > 0].float().mean() < 0.65


def test_masked_categories_get_no_mass_and_tau_follows_active_k(counts):
    module = CplMixVAEModule(counts.shape[1], n_categories=5)
    h = torch.randn(2, 7, module.category_head.n_in)
    for active in ([0, 1, 2, 3, 4], [0, 2, 4]):  # tau = 1 / K of the categories that survive
        module.category_mask[:] = False
        module.category_mask[active] = True
        p = torch.softmax(module.category_head(h)[..., active], dim=-1)
        q, _ = module.categorical_posterior(h)
        torch.testing.assert_close(q[..., active], torch.softmax(p * len(active), dim=-1))
    inference, _, loss = module(_tensors(counts))
    assert torch.all(inference["q"][..., [1, 3]] == 0)
    assert torch.all(inference["c"][..., [1, 3]] == 0)
    assert torch.isfinite(loss.loss)


def test_coupling_factor_scales_the_coupling_weight(counts):
    torch.manual_seed(0)
    module = CplMixVAEModule(counts.shape[1], n_categories=4, coupling_weight=2.0)
    state = module.state_dict()

    def loss_of(coupling_weight, **loss_kwargs):
        other = CplMixVAEModule(counts.shape[1], n_categories=4, coupling_weight=coupling_weight)
        other.load_state_dict(state)
        torch.manual_seed(1)
        return other(_tensors(counts), loss_kwargs=loss_kwargs)[2].loss

    torch.testing.assert_close(loss_of(2.0, coupling_factor=0.25), loss_of(0.5))
    torch.testing.assert_close(loss_of(2.0, coupling_factor=0.0), loss_of(0.0))
    assert not torch.allclose(loss_of(2.0), loss_of(0.0))  # the coupling term is not zero here


def test_single_agent_has_no_coupling_term(counts):
    module = CplMixVAEModule(counts.shape[1], n_agents=1)
    _, _, loss = module(_tensors(counts))
    assert "coupling" not in loss.extra_metrics
    assert torch.isfinite(loss.loss)


def test_loss_matches_the_published_formula(counts):
    torch.manual_seed(1)
    module = CplMixVAEModule(counts.shape[1], n_agents=3, n_categories=4, likelihood="gaussian", beta=0.5)
    inf, gen, loss = module(_tensors(counts))
    rec = -module.log_likelihood(counts, inf, gen)
    kl = 0.5 * (inf["qs_v"] + inf["qs_m"] ** 2 - 1 - inf["qs_v"].log()).sum(-1)
    ne = (inf["q"] * inf["log_q"]).sum(-1).mean(-1)
    dist = coupling_distance(inf["q"], module.category_mask, kind="clr")  # centred log-ratios
    expected = 2 * (rec + 0.5 * kl).mean(-1).sum()
    for a in range(3):
        for b in range(a + 1, 3):
            expected = expected + ne[a] + ne[b] + dist[a, b]
    torch.testing.assert_close(loss.loss, expected)


def test_batch_covariate_changes_the_decoder_output(counts):
    torch.manual_seed(0)
    module = CplMixVAEModule(
        counts.shape[1], covariates=CovariateLayout(n_batch=2), likelihood="nb", dispersion="gene-batch"
    )
    module.eval()
    zeros = torch.zeros(32, 1)
    _, gen0 = module(_tensors(counts, zeros), compute_loss=False)
    _, gen1 = module(_tensors(counts, zeros + 1), compute_loss=False)
    assert not torch.allclose(gen0["px_log_scale"], gen1["px_log_scale"])
    assert gen0["px_r"].shape == (2, 32, counts.shape[1])


def test_temperature_check_warns_for_a_tau_that_does_not_fit_k():
    with pytest.warns(UserWarning, match="too large"):
        check_temperature(0.5, 50)
    with pytest.warns(UserWarning, match="very small"):
        check_temperature(1e-5, 10)
    with pytest.warns(UserWarning, match="too large"):
        CplMixVAEModule(10, n_categories=40, tau=0.3)


def test_sample_returns_counts(counts):
    module = CplMixVAEModule(counts.shape[1])
    samples = module.sample(_tensors(counts), n_samples=2)
    assert samples.shape == (2, *counts.shape)
    assert torch.all(samples == samples.round()) and torch.all(samples >= 0)


@pytest.mark.parametrize("n_agents", [2, 3])
def test_entropy_terms_enter_the_loss_once_per_pair_at_weight_one(counts, n_agents, monkeypatch):
    # sum_{a<b} (NE_a + NE_b) = (A - 1) sum_a NE_a: the published weight 1, each agent's term in A - 1 pairs
    losses = {}
    for with_entropy in (True, False):
        if not with_entropy:
            monkeypatch.setattr(_module, "negative_entropy", lambda q, log_q: q.new_zeros(q.shape[0]))
        torch.manual_seed(3)
        module = CplMixVAEModule(counts.shape[1], n_agents=n_agents, likelihood="gaussian")
        module.eval()  # deterministic views; sampling is seeded
        torch.manual_seed(4)
        inf, _, loss = module(_tensors(counts))
        losses[with_entropy] = (loss.loss, (inf["q"] * inf["log_q"]).sum(-1).mean(-1).sum())
    expected = (n_agents - 1) * losses[True][1]
    # the loss is ~1e3 in float32: compare the difference at its precision
    torch.testing.assert_close(losses[True][0] - losses[False][0], expected, rtol=0, atol=3e-3)


def test_clr_coupling_distance_matches_a_hand_computation():
    q = torch.tensor([[[0.7, 0.2, 0.1], [0.1, 0.8, 0.1]], [[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]]])
    mask = torch.ones(3, dtype=torch.bool)
    eps, var_eps = 1e-8, 1e-4
    z = []
    for a in range(2):
        log_q = torch.log(q[a] + eps)
        clr = log_q - log_q.mean(-1, keepdim=True)
        z.append(clr / torch.sqrt(q[a].var(0, unbiased=False) + var_eps))
    expected = ((z[0] - z[1]) ** 2).sum(-1).mean()
    torch.testing.assert_close(coupling_distance(q, mask, kind="clr", eps=eps, var_eps=var_eps)[0, 1], expected)


def test_coupling_weight_cap_clips_a_category_the_minibatch_lacks():
    # category 2 holds no cell of this minibatch (the same stray mass on every cell, which differs between the
    # agents): no spread, so its weight is 1 / sqrt(var_eps) = 100, about 20 times that of the others; a cap of 5
    # weighs it 5, and a cap of 0 caps nothing
    stray = torch.tensor([1e-3, 1e-4]).view(2, 1, 1)
    first = torch.tensor([[[0.7], [0.2], [0.9]], [[0.6], [0.3], [0.8]]])
    q = torch.cat([first - stray, 1 - first, stray.expand(2, 3, 1)], dim=-1)
    mask = torch.ones(3, dtype=torch.bool)
    eps, var_eps = 1e-8, 1e-4
    cap = torch.tensor([0.0, 0.0, 5.0]).view(1, 1, 3)
    z = []
    for a in range(2):
        log_q = torch.log(q[a] + eps)
        weight = torch.rsqrt(q[a].var(0, unbiased=False) + var_eps)
        assert weight[2] == pytest.approx(100.0) and weight[:2].max() < 6
        z.append(log_q * torch.minimum(weight, torch.tensor([math.inf, math.inf, 5.0])))
    expected = ((z[0] - z[1]) ** 2).sum(-1).mean()
    capped = coupling_distance(q, mask, eps=eps, var_eps=var_eps, weight_cap=cap)[0, 1]
    torch.testing.assert_close(capped, expected)
    uncapped = coupling_distance(q, mask, eps=eps, var_eps=var_eps)
    torch.testing.assert_close(coupling_distance(q, mask, eps=eps, var_eps=var_eps, weight_cap=0 * cap), uncapped)
    assert capped < uncapped[0, 1]


def test_a_capped_coupling_weight_keeps_the_gradient_of_the_minibatch_spread():
    # category 2 is nearly absent from the minibatch; its weight is capped at 5. The value is that of the weight 5,
    # and the gradient still reaches the category's spread: d r / d Var = -(Var_floor + var_eps)^(-3/2) / 2, taken at
    # the spread that the cap stands for (Var_floor = 5^-2 - var_eps)
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 3, generator=gen)
    logits[..., 2] -= 6.0
    mask = torch.ones(3, dtype=torch.bool)
    eps, var_eps, cap = 1e-8, 1e-4, torch.tensor([0.0, 0.0, 5.0]).view(1, 1, 3)
    floor = torch.tensor([0.0, 0.0, 5.0**-2 - var_eps]).view(1, 1, 3)

    def hand(x, through_spread):
        q = x.softmax(-1)
        var = q.var(dim=1, keepdim=True, correction=0)
        full = torch.rsqrt(var + var_eps)
        if through_spread:  # the weight at the floor plus its first-order change with the spread there
            capped = torch.rsqrt(torch.maximum(var, floor).detach() + var_eps)
            capped = capped - 0.5 * (floor + var_eps).pow(-1.5) * (var - var.detach())
        else:  # a cap that also cuts that gradient: the smaller of the weight and the cap
            capped = torch.minimum(full, cap)
        z = torch.log(q + eps) * torch.where(cap > 0, capped, full)
        return ((z[0] - z[1]) ** 2).sum(-1).mean()

    grads = []
    for f in (lambda x: coupling_distance(x.softmax(-1), mask, eps=eps, var_eps=var_eps, weight_cap=cap)[0, 1],
              lambda x: hand(x, True), lambda x: hand(x, False)):  # fmt: skip
        x = logits.clone().requires_grad_(True)
        value = f(x)
        value.backward()
        grads.append((value.detach(), x.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])
    torch.testing.assert_close(grads[0][0], grads[2][0])  # the same value either way
    assert not torch.allclose(grads[0][1], grads[2][1])  # but not the same gradient


def test_coupling_weight_caps_follow_the_running_mean_while_the_categories_train():
    module = CplMixVAEModule(10, n_agents=2, n_categories=3)
    gen = torch.Generator().manual_seed(0)
    q1, q2 = (torch.rand(2, 16, 3, generator=gen).softmax(-1) for _ in range(2))
    weights = [torch.rsqrt(q.var(dim=1, keepdim=True, correction=0) + 1e-4) for q in (q1, q2)]
    assert torch.equal(module.coupling_weights, torch.zeros(2, 1, 3))  # not started
    module.train()
    torch.testing.assert_close(module.coupling_weight_caps(q1, 2.0), 2.0 * weights[0])  # the first sets it
    running = weights[0] + _module.COUPLING_WEIGHT_MOMENTUM * (weights[1] - weights[0])
    torch.testing.assert_close(module.coupling_weight_caps(q2, 2.0), 2.0 * running)
    module.categories_frozen = True  # the state phase: the categories learn nothing, the mean stays
    torch.testing.assert_close(module.coupling_weight_caps(q1, 1.0), running)
    module.categories_frozen = False
    module.eval()  # read-outs and validation neither
    torch.testing.assert_close(module.coupling_weight_caps(q1, 1.0), running)
    assert "coupling_weights" not in module.state_dict()  # training state, not saved


def _one_hot(labels, k):
    return torch.nn.functional.one_hot(labels, k).float()[None]


def test_condition_discrepancy_is_unbiased_when_proportions_match_and_grows_with_a_split_type():
    gen = torch.Generator().manual_seed(0)
    k, b = 10, 128
    # same proportions in both conditions: the plug-in estimate would be about (K - 1) / B on average, this one 0
    null = torch.stack([
        category_condition_discrepancy(_one_hot(torch.randint(k, (b,), generator=gen), k),
                                       torch.randint(2, (b,), generator=gen), 2)
        for _ in range(500)
    ])  # fmt: skip
    assert null.shape == (500, 1)
    assert abs(null.mean().item()) < 4 * null.std().item() / math.sqrt(500)
    assert abs(null.mean().item()) < 0.01
    # one category per condition: (1 - 0)^2 / 0.5 + (0 - 1)^2 / 0.5 = 4
    cond = torch.arange(b) % 2
    assert category_condition_discrepancy(_one_hot(cond, k), cond, 2).item() == pytest.approx(4.0)
    # a type of proportion 1/4 split into one category per condition costs about 4 * 1/4
    cond = (torch.arange(1024) // 4) % 2
    typ = torch.arange(1024) % 4 + 1
    split = torch.where((typ == 1) & (cond == 1), torch.zeros_like(typ), typ)
    assert category_condition_discrepancy(_one_hot(split, k), cond, 2).item() == pytest.approx(1.0, rel=0.05)


def test_condition_discrepancy_per_agent_ignores_absent_conditions_and_pushes_proportions_together():
    q = torch.softmax(torch.randn(2, 40, 5, generator=torch.Generator().manual_seed(1)), -1).requires_grad_()
    cond = torch.zeros(40, dtype=torch.long)
    cond[20:] = 2  # code 1 absent, code 3 has a single cell: neither forms a pair
    cond[39] = 3
    out = category_condition_discrepancy(q, cond, 4)
    only_pair = category_condition_discrepancy(q[:, :39], cond[:39], 4)
    assert out.shape == (2,)
    torch.testing.assert_close(out[0], category_condition_discrepancy(q[:1], cond, 4)[0])
    # the lone cell of code 3 only enters through the weights 1 / m_k
    assert out.detach().sub(only_pair.detach()).abs().max() < 0.05
    # one condition only: nothing to compare
    assert category_condition_discrepancy(q, torch.zeros(40, dtype=torch.long), 4).abs().max() == 0
    # gradient descent on the discrepancy brings the two conditions' mean posteriors closer
    logits = torch.randn(1, 64, 4, generator=torch.Generator().manual_seed(2)) + 3 * _one_hot(torch.arange(64) % 2, 4)
    logits.requires_grad_()
    halves = torch.arange(64) % 2
    gap = lambda p: (p[0, halves == 0].mean(0) - p[0, halves == 1].mean(0)).abs().sum().item()  # noqa: E731
    before = gap(torch.softmax(logits, -1))
    opt = torch.optim.SGD([logits], lr=5.0)
    for _ in range(50):
        opt.zero_grad()
        category_condition_discrepancy(torch.softmax(logits, -1), halves, 2).sum().backward()
        opt.step()
    assert gap(torch.softmax(logits, -1)) < 0.2 * before


def test_condition_divergence_is_zero_for_equal_proportions_small_for_a_shift_and_large_for_a_split():
    shares = torch.tensor([0.5, 0.5])
    same = torch.tensor([[[0.5, 0.3, 0.2], [0.5, 0.3, 0.2]]])
    assert category_condition_divergence(same, shares).abs().item() < 1e-6
    # a shift of composition: by hand, sum_g pi_g KL(m || r_g)
    shifted = torch.tensor([[[0.36, 0.44, 0.2], [0.29, 0.51, 0.2]]])
    m = (shares[:, None] * shifted[0]).sum(0)
    by_hand = sum(0.5 * (m * (m / shifted[0, g]).log()).sum() for g in range(2))
    torch.testing.assert_close(category_condition_divergence(shifted, shares)[0], by_hand)
    # about half the chi-square distance sum_g pi_g sum_k (r_gk - m_k)^2 / m_k
    chi2 = (shares[:, None] * (shifted[0] - m) ** 2 / m).sum()
    assert by_hand.item() == pytest.approx(chi2.item() / 2, rel=0.05)
    # a type of proportion 0.2 split into one category per condition (the fourth category holds its second half)
    split = torch.tensor([[[0.5, 0.3, 0.2, 0.0], [0.5, 0.3, 0.0, 0.2]]])
    assert category_condition_divergence(split, shares).item() > 100 * by_hand.item()
    # in each condition: 0.1 log(0.1 / 1e-6) for the missing half, 0.1 log(0.1 / 0.2) for the doubled one
    expected = 0.1 * math.log(0.1 / 1e-6) + 0.1 * math.log(0.5)
    assert category_condition_divergence(split, shares).item() == pytest.approx(expected, rel=1e-4)
    # a condition of weight 0 takes no part; agents are separate
    three = torch.cat([shifted, torch.tensor([[[0.0, 0.0, 1.0]]])], 1)
    torch.testing.assert_close(category_condition_divergence(three, torch.tensor([0.5, 0.5, 0.0])), by_hand[None])
    agents = torch.cat([same, shifted])
    torch.testing.assert_close(category_condition_divergence(agents, shares), torch.stack([torch.tensor(0.0), by_hand]))


def test_condition_category_means_per_agent_leave_out_unknown_cells_and_count_each_condition():
    q = torch.softmax(torch.randn(2, 12, 3, generator=torch.Generator().manual_seed(0)), -1)
    condition = torch.tensor([0, 2] * 4 + [-1] * 4)[:, None]
    means, n = condition_category_means(q, condition, 3)
    assert means.shape == (2, 3, 3)
    torch.testing.assert_close(n, torch.tensor([4.0, 0.0, 4.0]))
    torch.testing.assert_close(means[:, 0], q[:, 0:8:2].mean(1))
    torch.testing.assert_close(means[:, 2], q[:, 1:8:2].mean(1))
    assert means[:, 1].abs().max() == 0


def _conditioned_module(n_categories=4):
    layout = CovariateLayout(n_conditions=2)
    return CplMixVAEModule(20, n_categories=n_categories, n_hidden=8, n_agents=2, covariates=layout)


def test_condition_divergence_takes_its_value_from_running_proportions_and_its_gradient_from_the_minibatch():
    module = _conditioned_module()
    gen = torch.Generator().manual_seed(0)
    cond = torch.arange(16) % 2
    first = torch.softmax(torch.randn(2, 16, 4, generator=gen), -1)
    module.train()
    torch.testing.assert_close(
        module.condition_divergence(first, cond), category_condition_divergence(*_means_and_shares(first, cond))
    )
    assert module.condition_seen.all()
    # a second minibatch moves the running proportions by the momentum only
    logits = torch.randn(2, 16, 4, generator=gen).requires_grad_()
    second = torch.softmax(logits, -1)
    running = _module.CONDITION_MOMENTUM
    expected = condition_category_means(first, cond, 2)[0].lerp(condition_category_means(second, cond, 2)[0], running)
    value = module.condition_divergence(second, cond)
    torch.testing.assert_close(module.condition_means, expected.detach())
    torch.testing.assert_close(value, category_condition_divergence(expected, torch.tensor([0.5, 0.5])))
    # the gradient is that of the divergence in the minibatch's own proportions, taken at the running ones
    value.sum().backward()
    grad_module = logits.grad.clone()
    logits.grad = None
    means = condition_category_means(torch.softmax(logits, -1), cond, 2)[0]
    at_running = expected.detach() + means - means.detach()
    category_condition_divergence(at_running, torch.tensor([0.5, 0.5])).sum().backward()
    torch.testing.assert_close(grad_module, logits.grad)
    # evaluation mode reads the running proportions without moving them; a condition absent from the minibatch
    # keeps its own
    module.eval()
    only_first = torch.zeros(16, dtype=torch.long)
    module.condition_divergence(torch.softmax(torch.randn(2, 16, 4, generator=gen), -1), only_first)
    torch.testing.assert_close(module.condition_means, expected.detach())
    module.train()
    third = torch.softmax(torch.randn(2, 16, 4, generator=gen), -1)
    module.condition_divergence(third, only_first)
    torch.testing.assert_close(module.condition_means[:, 1], expected[:, 1].detach())


def _means_and_shares(q, cond):
    means, n = condition_category_means(q, cond, 2)
    return means, n / n.sum()


def test_descending_the_condition_divergence_rejoins_a_type_split_by_condition():
    module = _conditioned_module(n_categories=3)
    module.train()
    cond = torch.arange(64) % 2
    # category 1 holds the control half of a type, category 2 its stimulated half
    split = torch.where((torch.arange(64) % 4 >= 2) & (cond == 1), 2, torch.where(torch.arange(64) % 4 >= 2, 1, 0))
    logits = (4 * torch.nn.functional.one_hot(split, 3).float()).expand(2, 64, 3).clone().requires_grad_()
    before = module.condition_divergence(torch.softmax(logits, -1), cond).detach()
    opt = torch.optim.SGD([logits], lr=1.0)
    for _ in range(300):
        opt.zero_grad()
        module.condition_divergence(torch.softmax(logits, -1), cond).sum().backward()
        opt.step()
    q = torch.softmax(logits.detach(), -1)
    after = category_condition_divergence(*_means_and_shares(q, cond))
    assert (after < 0.1 * before).all()
    # neither condition lacks either of the split type's categories any more (each held ~0.01 of a condition);
    # the other type stays in its own
    means = condition_category_means(q, cond, 2)[0]
    assert means[:, :, 1:].min() > 0.15
    assert (q[:, split == 0].argmax(-1) == 0).all()


def test_condition_penalty_enters_the_loss_only_with_a_condition(counts):
    torch.manual_seed(0)
    module = CplMixVAEModule(counts.shape[1], n_categories=4, n_hidden=16, covariates=CovariateLayout(n_conditions=2))
    module.eval()
    cond = (torch.arange(counts.shape[0]) % 2)[:, None].float()
    tensors = {REGISTRY_KEYS.X_KEY: counts}
    torch.manual_seed(1)  # the state is sampled
    inf, _, plain = module(tensors)
    torch.manual_seed(1)
    _, _, with_cond = module({**tensors, "condition": cond})
    divergence = category_condition_divergence(*_means_and_shares(inf["q"], cond))
    gap = category_condition_discrepancy(inf["q"], cond, 2)
    penalty = _module.CONDITION_WEIGHT * divergence.sum() + _module.CONDITION_SHARE_WEIGHT * gap.sum()
    torch.testing.assert_close(with_cond.loss, plain.loss + penalty)
    for key in ("condition_divergence", "condition_discrepancy"):
        assert key in with_cond.extra_metrics and key not in plain.extra_metrics
