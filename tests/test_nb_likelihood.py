"""The fused negative binomial likelihood against scvi-tools' distribution: values and gradients."""

import pytest
import torch
from scvi.distributions import NegativeBinomial

from scmixvae.module._losses import (
    NB_TABLE_COUNTS,
    csr_nonzero,
    nb_log_likelihood,
    nb_log_likelihood_dense,
    nb_log_likelihood_reference,
    nonzero_indices,
)


def _inputs(theta_shape, scale=30.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.poisson(torch.rand(16, 40, generator=gen) * scale, generator=gen)
    x[:, 0] += 1
    log_mu = torch.randn(2, 16, 40, generator=gen, dtype=torch.float64).requires_grad_()
    theta = (torch.rand(*theta_shape, generator=gen, dtype=torch.float64) * 5 + 0.05).requires_grad_()
    return x.double(), log_mu, theta


def _scvi(x, log_mu, theta):
    return NegativeBinomial(mu=log_mu.exp(), theta=theta.expand_as(log_mu)).log_prob(x).sum(-1)


@pytest.mark.parametrize("theta_shape", [(2, 1, 40), (2, 16, 40)], ids=["per-gene", "per-cell"])
def test_values_and_gradients_match_scvi_negative_binomial(theta_shape):
    x, log_mu, theta = _inputs(theta_shape)
    assert (x > NB_TABLE_COUNTS).any() and ((x > 0) & (x <= NB_TABLE_COUNTS)).any()  # both code paths
    ours, ref = nb_log_likelihood(x, log_mu, theta), _scvi(x, log_mu, theta)
    torch.testing.assert_close(ours, ref)
    weights = torch.randn_like(ours)
    grads = torch.autograd.grad((ours * weights).sum(), [log_mu, theta])
    expected = torch.autograd.grad((ref * weights).sum(), [log_mu, theta])
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)  # float64 round-off of two formulas


def test_fused_node_passes_gradcheck():
    x, log_mu, theta = _inputs((2, 1, 40), scale=25.0, seed=1)
    assert torch.autograd.gradcheck(lambda m, t: nb_log_likelihood(x, m, t), (log_mu, theta))


def test_float32_fused_equals_reference_and_works_without_grad():
    x, log_mu, theta = _inputs((2, 1, 40), seed=2)
    x, log_mu, theta = x.float(), log_mu.detach().float(), theta.detach().float()
    with torch.no_grad():
        fused = nb_log_likelihood(x, log_mu, theta)
    torch.testing.assert_close(fused, nb_log_likelihood_reference(x, log_mu, theta), rtol=1e-5, atol=1e-3)


def test_mixed_precision_computes_the_likelihood_in_float32():
    x, log_mu, theta = _inputs((2, 1, 40), seed=3)
    x, log_mu, theta = x.float(), log_mu.detach().float().requires_grad_(), theta.detach().float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = nb_log_likelihood(x, log_mu.to(torch.bfloat16), theta)
    assert mixed.dtype == torch.float32
    mixed.sum().backward()
    plain = nb_log_likelihood(x, log_mu.to(torch.bfloat16).float(), theta)
    torch.testing.assert_close(mixed, plain)
    assert log_mu.grad is not None and torch.isfinite(log_mu.grad).all()


@pytest.mark.parametrize("theta_shape", [(2, 1, 40), (2, 16, 40)], ids=["per-gene", "per-cell"])
def test_dense_accelerator_path_matches_scvi_in_value_and_gradient(theta_shape):
    x, log_mu, theta = _inputs(theta_shape, seed=4)
    dense, ref = nb_log_likelihood_dense(x, log_mu, theta), _scvi(x, log_mu, theta)
    torch.testing.assert_close(dense, ref)
    grads = torch.autograd.grad(dense.sum(), [log_mu, theta])
    expected = torch.autograd.grad(ref.sum(), [log_mu, theta])
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = nb_log_likelihood_dense(x.float(), log_mu.detach().to(torch.bfloat16), theta.detach().float())
    assert mixed.dtype == torch.float32


@pytest.mark.parametrize("theta_shape", [(2, 1, 40), (2, 16, 40)], ids=["per-gene", "per-cell"])
def test_log_library_offset_equals_adding_it_to_the_log_means(theta_shape):
    x, log_scale, theta = _inputs(theta_shape, seed=4)
    log_library = (torch.rand(16, 1, dtype=torch.float64) * 3 + 5).requires_grad_()
    ours = nb_log_likelihood(x, log_scale, theta, log_library=log_library)
    ref = _scvi(x, log_scale + log_library, theta)
    torch.testing.assert_close(ours, ref)
    weights = torch.randn_like(ours)
    grads = torch.autograd.grad((ours * weights).sum(), [log_scale, theta, log_library])
    expected = torch.autograd.grad((ref * weights).sum(), [log_scale, theta, log_library])
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)
    dense = nb_log_likelihood_dense(x, log_scale, theta, log_library=log_library)
    torch.testing.assert_close(dense, ref)


def test_fused_node_with_log_library_passes_gradcheck():
    x, log_scale, theta = _inputs((2, 1, 40), scale=25.0, seed=5)
    log_library = (torch.rand(16, 1, dtype=torch.float64) + 2).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda m, t, lib: nb_log_likelihood(x, m, t, log_library=lib), (log_scale, theta, log_library)
    )


@pytest.mark.parametrize("theta_shape", [(2, 1, 40), (2, 16, 40)], ids=["per-gene", "per-cell"])
@pytest.mark.parametrize("with_library", [True, False], ids=["library", "no-library"])
def test_logits_input_equals_the_log_softmax_of_the_logits(theta_shape, with_library):
    x, logits, theta = _inputs(theta_shape, seed=6)
    logits = (logits.detach() * 3 + 2).requires_grad_()  # unnormalised, with a large spread
    log_library = (torch.rand(16, 1, dtype=torch.float64) * 3 + 5).requires_grad_() if with_library else None
    ours = nb_log_likelihood(x, logits, theta, log_library=log_library, logits=True)
    log_mu = torch.log_softmax(logits, -1) + (0 if log_library is None else log_library)
    # plain autograd of the same formula (scvi's NegativeBinomial adds 1e-8 inside log(mu), which matters for
    # the tiny means of a softmax without a library size)
    ref = nb_log_likelihood_reference(x, log_mu, theta)
    torch.testing.assert_close(ours, ref)
    inputs = [logits, theta] + ([log_library] if with_library else [])
    weights = torch.randn_like(ours)
    grads = torch.autograd.grad((ours * weights).sum(), inputs)
    expected = torch.autograd.grad((ref * weights).sum(), inputs)
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)
    assert grads[0].sum(-1).abs().max() < 1e-8  # a shift of all logits changes nothing


def test_fused_node_with_logits_passes_gradcheck():
    x, logits, theta = _inputs((2, 1, 40), scale=25.0, seed=7)
    log_library = (torch.rand(16, 1, dtype=torch.float64) + 2).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda z, t, lib: nb_log_likelihood(x, z, t, log_library=lib, logits=True), (logits, theta, log_library)
    )


def test_counts_read_from_a_sparse_minibatch_give_the_dense_result():
    x, logits, theta = _inputs((2, 1, 40), seed=8)
    log_library = torch.log(x.sum(-1, keepdim=True))
    x_csr = x.to_sparse_csr()
    nonzero, counts = csr_nonzero(x_csr)
    rows, cols, flat = nonzero_indices(x)
    # the same entries, in the same (row-major) order, as the dense search
    for got, want in zip(nonzero, (rows, cols, flat), strict=True):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(counts, x[rows, cols])
    sparse = nb_log_likelihood(
        x_csr, logits, theta, nonzero=nonzero, counts=counts, log_library=log_library, logits=True
    )
    dense = nb_log_likelihood(x, logits, theta, log_library=log_library, logits=True)
    torch.testing.assert_close(sparse, dense)
    torch.testing.assert_close(
        torch.autograd.grad(sparse.sum(), [logits, theta]), torch.autograd.grad(dense.sum(), [logits, theta])
    )


def test_fused_node_supports_a_second_backward():
    x, logits, theta = _inputs((2, 1, 40), seed=9)
    ll = nb_log_likelihood(x, logits, theta, log_library=torch.log(x.sum(-1, keepdim=True)), logits=True).sum()
    first = torch.autograd.grad(ll, [logits, theta], retain_graph=True)
    second = torch.autograd.grad(ll, [logits, theta])  # saved tensors are not overwritten by the first
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
