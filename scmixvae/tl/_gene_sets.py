"""Curated gene sets and their enrichment among each type's state genes."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import stats

from .. import _validation as check
from .._constants import DEFAULT_STATE_GENES_KEY
from ._state_genes import _get_ranking

logger = logging.getLogger(__name__)

GeneSetName = Literal["immediate_early", "interferon"]
Species = Literal["human", "mouse"]

#: Number of top-ranked genes counted in the ``n_in_top20`` column of :func:`gene_set_enrichment`.
_TOP = 20

# Human symbols -> mouse symbols where the mouse gene is not simply the capitalised human symbol. An empty
# tuple drops a gene without a one-to-one mouse orthologue; several symbols list co-orthologues or aliases.
_IMMEDIATE_EARLY_HUMAN = (
    # AP-1 and EGR families
    "FOS", "FOSB", "FOSL1", "FOSL2", "JUN", "JUNB", "EGR1", "EGR2", "EGR3", "EGR4",
    # NR4A orphan receptors and neuronal activity-regulated genes
    "NR4A1", "NR4A2", "NR4A3", "ARC", "NPAS4", "BDNF", "HOMER1",
    # other rapid primary response genes (MAPK/ERK-dependent first wave)
    "IER2", "IER3", "IER5", "ATF3", "DUSP1", "DUSP5", "DUSP6", "BTG2", "GADD45B", "GADD45G",
    "KLF2", "KLF4", "KLF6", "KLF10", "MAFF", "PPP1R15A", "TRIB1", "SIK1", "ZFP36", "PER1",
    "AMIGO3", "SERTAD1", "CREM", "RGS2", "SGK1", "NFKBIA", "PTGS2",
    # CCN family (current HGNC symbol and the older alias still used by many annotations)
    "CCN1", "CYR61", "CCN2", "CTGF",
)  # fmt: skip
_IMMEDIATE_EARLY_MOUSE = {"CCN1": ("Ccn1",), "CYR61": ("Cyr61",), "CCN2": ("Ccn2",), "CTGF": ("Ctgf",)}

_INTERFERON_HUMAN = (
    "ISG15", "ISG20", "IFIT1", "IFIT2", "IFIT3", "IFIT5", "IFI6", "IFI27", "IFI35", "IFI44", "IFI44L",
    "IFITM1", "IFITM2", "IFITM3", "MX1", "MX2", "OAS1", "OAS2", "OAS3", "OASL", "RSAD2", "CMPK2",
    "LY6E", "HERC5", "HERC6", "XAF1", "STAT1", "STAT2", "IRF1", "IRF7", "IRF9", "BST2", "USP18",
    "EPSTI1", "DDX58", "RIGI", "IFIH1", "DDX60", "EIF2AK2", "PLSCR1", "SAMD9L", "PARP9", "PARP14",
    "TRIM22", "SP110", "GBP1", "LGALS3BP", "RTP4", "UBE2L6", "PSMB8", "PSMB9", "TAP1", "CXCL10", "LAMP3",
)  # fmt: skip
_INTERFERON_MOUSE = {
    "IFIT3": ("Ifit3", "Ifit3b"),
    "IFIT5": (),
    "IFI6": (),
    "IFI27": ("Ifi27", "Ifi27l2a"),
    "OAS1": ("Oas1a", "Oas1g"),
    "OASL": ("Oasl1", "Oasl2"),
    "HERC5": (),
    "TRIM22": (),
    "GBP1": ("Gbp2",),
    "RIGI": ("Rigi",),
}

_SETS = {
    "immediate_early": (_IMMEDIATE_EARLY_HUMAN, _IMMEDIATE_EARLY_MOUSE),
    "interferon": (_INTERFERON_HUMAN, _INTERFERON_MOUSE),
}


def gene_sets(name: GeneSetName, species: Species = "human") -> list[str]:
    """Return a curated gene set as gene symbols of ``species``.

    ``"immediate_early"``
        Immediate-early / activity-regulated genes: a core compiled from the rapid primary response
        genes of Tyssowski et al. (2018, *Neuron* 98:530, "Different neuronal activity patterns induce
        different gene expression programs"), the activity-regulated genes shared across cortical cell
        types in Hrvatin et al. (2018, *Nat. Neurosci.* 21:120) and the immediate-early genes of Wu et al.
        (2017, *Neuron* 96:313, "Detecting activated cell populations using single-cell RNA-seq"): the
        AP-1, EGR and NR4A families, ARC, NPAS4, BDNF, DUSP1/5/6, IER2/3/5, ATF3, KLF family members and
        other first-wave genes. Many of them are also induced by tissue dissociation.
    ``"interferon"``
        Interferon-stimulated genes: a core of the ISGs of Schoggins et al. (2011, *Nature* 472:481, "A
        diverse range of gene products are effectors of the type I interferon antiviral response")
        and of MSigDB's ``HALLMARK_INTERFERON_ALPHA_RESPONSE`` (Liberzon et al. 2015, *Cell Syst.* 1:417),
        e.g. ISG15, IFIT1-3, IFI6, MX1/2, OAS1-3, RSAD2, LY6E, IFITM3, STAT1, IRF7.

    These are curated cores, not complete copies of the published lists. Genes renamed recently appear
    under both symbols (``CCN1``/``CYR61``, ``DDX58``/``RIGI``); symbols absent from the data are ignored
    by :func:`gene_set_enrichment`. Mouse symbols are the capitalised human ones (``Fos``) except where the
    orthologue differs (``OAS1`` -> ``Oas1a``, ``Oas1g``); genes without a mouse orthologue (``IFI6``,
    ``HERC5``, ``TRIM22``, ``IFIT5``) are left out.

    Parameters
    ----------
    name
        ``"immediate_early"`` or ``"interferon"``.
    species
        ``"human"`` (upper-case HGNC symbols) or ``"mouse"`` (MGI symbols).

    Returns
    -------
    The gene symbols, without duplicates, in a fixed order.
    """
    if name not in _SETS:
        raise ValueError(f"Unknown gene set {name!r}; choose one of {sorted(_SETS)}.")
    if species not in ("human", "mouse"):
        raise ValueError(f'`species` must be "human" or "mouse", got {species!r}.')
    human, mouse = _SETS[name]
    if species == "human":
        return list(human)
    genes = []
    for gene in human:
        genes.extend(mouse.get(gene, (gene.capitalize(),)))
    return list(dict.fromkeys(genes))


def default_gene_sets(species: Species = "human") -> dict[str, list[str]]:
    """Return the built-in sets of :func:`gene_sets` as a mapping, the default of :func:`gene_set_enrichment`."""
    return {name: gene_sets(name, species) for name in _SETS}


def _present_genes(name: str, genes, var_names: pd.Index) -> list[str]:
    """Return the genes of one set that are in ``var_names`` (absent ones are logged)."""
    if isinstance(genes, str) or not isinstance(genes, Sequence | set | frozenset | np.ndarray | pd.Index):
        raise TypeError(
            f"Gene set {name!r} must be a sequence of gene names, e.g. scmixvae.tl.gene_sets('interferon'), "
            f"got {type(genes).__name__}."
        )
    wanted = list(dict.fromkeys(str(g) for g in genes))
    present = [g for g in wanted if g in var_names]
    if len(present) < len(wanted):
        logger.info(
            "%d of %d genes of the set %r are not in adata.var_names and are ignored.",
            len(wanted) - len(present),
            len(wanted),
            name,
        )
    return present


def _test_group(names, scores, present, method, n_permutations, rng) -> dict:
    """Enrichment of one gene set among one group's ranked genes."""
    in_set = np.isin(names, present)
    m = int(in_set.sum())
    ranks = stats.rankdata(-scores, method="average")
    mean_rank = float(ranks[in_set].mean())
    if method == "rank":
        test = stats.mannwhitneyu(scores[in_set], scores[~in_set], alternative="greater")
        statistic, pvalue = float(test.statistic), float(test.pvalue)
    else:
        null = np.array([ranks[rng.choice(len(ranks), m, replace=False)].mean() for _ in range(n_permutations)])
        statistic = mean_rank
        pvalue = (1.0 + np.sum(null <= mean_rank)) / (1.0 + n_permutations)
    top = np.argsort(-scores, kind="stable")[:_TOP]
    return {
        "n_genes_in_set": m,
        "statistic": statistic,
        "mean_rank": mean_rank,
        "pvalue": float(np.clip(pvalue, 0.0, 1.0)),
        "n_in_top20": int(in_set[top].sum()),
    }


def _check_same_genes_ranked(ranking: dict, key: str, n_vars: int) -> None:
    """Refuse a ranking cut to each group's top genes: its groups rank different genes, fewer than all.

    The tests compare a set's genes with the other ranked genes; among a group's top genes alone, a set that ranks
    high overall looks like chance. A ranking of the same genes in every group (all of them, or a subset such as
    scanpy's ``mask_var``) is fine.
    """
    names = ranking["names"]
    n_ranked = len(names)
    if n_ranked >= n_vars:
        return
    ranked = {frozenset(np.asarray(names[group], dtype=str)) for group in names.dtype.names}
    if len(ranked) > 1:
        raise ValueError(
            f"adata.uns[{key!r}] ranks only each group's top {n_ranked} of the {n_vars} genes; the test compares a "
            "set's genes with all the others, so rank every gene (scanpy.tl.rank_genes_groups with n_genes=None, "
            "its default)."
        )


def gene_set_enrichment(
    adata: AnnData,
    gene_set: Mapping[str, Sequence[str]] | Sequence[str] | None = None,
    *,
    key: str = DEFAULT_STATE_GENES_KEY,
    method: Literal["rank", "permutation"] = "rank",
    n_permutations: int = 1000,
    species: Species = "human",
    seed: int = 0,
) -> pd.DataFrame:
    """Test, for each group, whether a gene set ranks higher among its state genes than chance.

    Parameters
    ----------
    adata
        AnnData with a ranking from :func:`~scmixvae.tl.rank_state_genes` (or
        :func:`scanpy.tl.rank_genes_groups`) in ``uns[key]``.
    gene_set
        One gene set (a sequence of gene names), or any mapping of set name to gene names, e.g. MSigDB
        collections read with decoupler or gseapy (``{"HALLMARK_INTERFERON_ALPHA_RESPONSE": [...], ...}``).
        ``None``: the built-in curated sets of :func:`gene_sets` for ``species`` (``"interferon"`` and
        ``"immediate_early"``). Genes absent from ``adata.var_names`` are ignored (logged); in a mapping, sets
        with no gene in the data are skipped (logged).
    key
        Key of the ranking in ``uns``.
    method
        ``"rank"``: one-sided Mann–Whitney U test of the set's scores against the scores of all other
        ranked genes (:func:`scipy.stats.mannwhitneyu`, ``alternative="greater"``); ``statistic`` is U.
        ``"permutation"``: the set's mean rank against the mean ranks of ``n_permutations`` random gene
        sets of the same size; ``statistic`` is the mean rank and the p-value is
        ``(1 + #{random mean rank <= observed}) / (1 + n_permutations)``.
    n_permutations
        Number of random sets of ``method="permutation"``.
    species
        Species of the built-in sets used when ``gene_set=None``.
    seed
        Seed of the random sets.

    Returns
    -------
    A :class:`~pandas.DataFrame`, one row per group (and per set for a mapping, with a first column
    ``gene_set``): ``group``, ``n_genes_in_set`` (genes of the set in the ranking), ``statistic``,
    ``mean_rank`` (1 is the top gene), ``pvalue``, ``pvalue_adj`` (Benjamini–Hochberg,
    :func:`scipy.stats.false_discovery_control`, across all rows) and ``n_in_top20`` (genes of the set among
    the group's 20 top-ranked genes).

    Examples
    --------
    Any collection of gene sets, e.g. MSigDB's hallmarks through decoupler or gseapy:

    >>> sets = {"ISG": ["ISG15", "IFIT1", "MX1"], "IEG": ["FOS", "JUNB", "EGR1"]}
    >>> scmixvae.tl.gene_set_enrichment(adata, sets)

    To hand one group's ranking to a dedicated enrichment tool instead (neither is a dependency of scmixvae):

    >>> ranking = scmixvae.tl.get_state_genes(adata, group="3").set_index("names")["scores"]
    >>> # decoupler: a genes x sets network with columns source/target
    >>> # dc.run_ulm(mat=ranking.to_frame().T, net=msigdb_net) (dc.mt.ulm in decoupler >= 2)
    >>> # gseapy: pre-ranked GSEA on the same scores
    >>> # gseapy.prerank(rnk=ranking, gene_sets="MSigDB_Hallmark_2020")
    """
    ranking = _get_ranking(adata, key)
    _check_same_genes_ranked(ranking, key, adata.n_vars)
    if method not in ("rank", "permutation"):
        raise ValueError(f'`method` must be "rank" or "permutation", got {method!r}.')
    check.check_int("n_permutations", n_permutations, minimum=1)
    several = gene_set is None or isinstance(gene_set, Mapping)
    sets = default_gene_sets(species) if gene_set is None else gene_set if several else {"gene_set": gene_set}
    if several and not sets:
        raise ValueError("`gene_set` is an empty mapping; give at least one set of gene names.")
    present = {name: _present_genes(name, genes, adata.var_names) for name, genes in sets.items()}
    if not any(present.values()):
        first = next(iter(sets.values()))
        raise ValueError(
            "None of the genes of the set(s) is in adata.var_names; check the species and the symbols "
            f"(first genes of a set: {list(first)[:5]}, of var_names: {list(adata.var_names[:5])})."
        )
    rng = np.random.default_rng(seed)
    rows = []
    for name, genes in present.items():
        if not genes:
            logger.info("No gene of the set %r is in adata.var_names; it is skipped.", name)
            continue
        for group in ranking["names"].dtype.names:
            names = np.asarray(ranking["names"][group], dtype=str)
            m = int(np.isin(names, genes).sum())
            if m == 0 or m == len(names):
                raise ValueError(
                    f"The gene set {name!r} covers {m} of the {len(names)} ranked genes of group {group!r}; "
                    "it must contain some but not all of them."
                )
            scores = np.asarray(ranking["scores"][group], dtype=np.float64)
            row = _test_group(names, scores, genes, method, n_permutations, rng)
            rows.append({"gene_set": name, "group": str(group), **row})
    out = pd.DataFrame(rows)
    out.insert(out.columns.get_loc("pvalue") + 1, "pvalue_adj", stats.false_discovery_control(out["pvalue"]))
    return out if several else out.drop(columns="gene_set")
