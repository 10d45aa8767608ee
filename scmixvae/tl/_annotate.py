"""Write a trained model's types and states into AnnData."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import torch
from anndata import AnnData

from .. import _validation as check
from .._constants import DEFAULT_KEY, agent_type_key, agreement_key, confidence_key, state_key, type_key
from .._scoring import agreement_matrix


def annotate(
    adata: AnnData,
    model,
    *,
    key_added: str = DEFAULT_KEY,
    batch_size: int | None = None,
    copy: bool = False,
) -> AnnData | None:
    """Write consensus types, their confidence, per-agent types and the state latent into ``adata``.

    Parameters
    ----------
    adata
        AnnData with the model's training genes (the training AnnData or new cells).
    model
        A trained :class:`~scmixvae.model.CplMixVAE`.
    key_added
        Prefix of every key written.
    batch_size
        Minibatch size of the read-outs.
    copy
        Return a modified copy instead of writing into ``adata``.

    Returns
    -------
    ``None``, or the annotated copy when ``copy=True``. Writes

    - ``obs[f"{key_added}_type"]``: consensus category (categorical of strings; categories without cells are
      dropped, so that scanpy's plots accept the column);
    - ``obs[f"{key_added}_confidence"]``: mean posterior mass of the agents on the consensus category;
    - ``obs[f"{key_added}_agree"]``: whether every agent's own category equals the consensus;
    - ``obs[f"{key_added}_agent{a}_type"]``: each agent's category (categories without cells dropped, as above;
      those of further agents, written by a model with more agents, are removed);
    - ``obsm[f"X_{key_added}_state"]``: the consensus state latent
      (:meth:`~scmixvae.model.CplMixVAE.get_latent_representation`);
    - ``uns[key_added]``: ``params`` (the model's parameters as h5ad-serialisable values), ``setup_args``
      (the arguments of :meth:`~scmixvae.model.CplMixVAE.setup_anndata`, same encoding), ``n_categories`` (the
      model's surviving categories), ``categories`` (their names) and ``agent_agreement`` (pairwise agreement
      matrix).
    """
    check.check_anndata(adata)
    check.check_model(model)
    check.check_key_added(key_added)
    if copy:
        adata = check.copy_of(adata)
    target = adata
    q, state = _posteriors_and_states(model, adata, batch_size)
    categories = model.category_names
    mean_q = q.mean(0)
    consensus = mean_q.argmax(1)
    agent_labels = q.argmax(-1)
    consensus_labels = pd.Categorical.from_codes(consensus, categories=categories)
    target.obs[type_key(key_added)] = consensus_labels.remove_unused_categories()
    target.obs[confidence_key(key_added)] = mean_q[np.arange(len(consensus)), consensus].astype(np.float32)
    target.obs[agreement_key(key_added)] = (agent_labels == consensus[None]).all(0)
    for a in range(q.shape[0]):
        labels = pd.Categorical.from_codes(agent_labels[a], categories=categories)
        target.obs[agent_type_key(key_added, a)] = labels.remove_unused_categories()  # as the consensus column
    stale = q.shape[0]  # the columns of agents a model with more agents wrote under this key
    while agent_type_key(key_added, stale) in target.obs:
        del target.obs[agent_type_key(key_added, stale)]
        stale += 1
    target.obsm[state_key(key_added)] = state.astype(np.float32)
    agreement = agreement_matrix(agent_labels)
    params = {k: v for k, v in model.init_params_["non_kwargs"].items()}
    params.update(model.init_params_.get("kwargs", {}).get("module_kwargs", {}) or {})
    setup_args = dict(model.adata_manager.registry.get("setup_args", {}))
    target.uns[key_added] = {
        "params": _serialisable(params),
        "setup_args": _serialisable(setup_args),
        "categories": np.asarray(categories, dtype=str),
        "agent_agreement": agreement,
        "n_categories": int(model.n_categories),
    }
    return adata if copy else None


def _posteriors_and_states(model, adata: AnnData, batch_size: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Category posteriors ``(A, n, K)`` of the surviving categories and the consensus state latent, in one pass.

    The state is :meth:`~scmixvae.model.CplMixVAE.get_latent_representation`'s (agent 0's state posterior mean
    given the consensus category).
    """
    qs, states = [], []
    with torch.inference_mode():  # as the model's read-outs
        for _, out in model.iter_inference(adata, batch_size=batch_size):
            qs.append(out["q"].cpu().numpy())
            states.append(model.module.consensus_state(out["q"], out["hs"])[1][0].cpu().numpy())
    q = np.concatenate(qs, 1)[..., model.module.category_mask.cpu().numpy()]
    state = np.concatenate(states, 0)
    check.check_finite_posteriors(q, state)
    return q, state


def _serialisable(values: dict) -> dict:
    """``None``, dictionaries and lists as JSON strings, so that ``write_h5ad`` keeps them."""
    return {k: (json.dumps(v) if v is None or isinstance(v, dict | list | tuple) else v) for k, v in values.items()}
