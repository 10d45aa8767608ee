"""Draw the figures of the user guide (docs/user_guide/model.md) into docs/_static/.

Run from anywhere with ``python docs/_static/make_figures.py``; it takes a couple of minutes on one CPU thread.
It writes

- ``model_diagram.png``: the agents, their views, heads and decoders, the coupling and the consensus (drawn with
  matplotlib, no model needed);
- ``k_choice.png``: number of categories against mean consensus over the pruning rounds of a default fit (the
  model chooses the number of types) on simulated data;
- ``state_traversal.png``: the top state genes of that fit's largest type along its state axis.

Only the public API of scmixvae is used; the fit is seeded and runs on one thread, so a rerun on the same versions
draws the same figures.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("NUMBA_NUM_THREADS", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch
from matplotlib.ticker import MaxNLocator

OUT = Path(__file__).resolve().parent
SEED = 0
DPI = 130
plt.rcParams.update({"font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11, "savefig.dpi": DPI})

# ------------------------------------------------------------------------------------------------ the diagram
_COLOURS = {
    "cell": "#f2f2f2",
    "view": "#fde9c9",
    "cat": "#cfe3f7",
    "state": "#d8efd3",
    "decoder": "#ead7f3",
    "consensus": "#fbd3d3",
}
_W, _H = 2.1, 1.0  # box width and height (data units)


def _box(ax, x, y, text, colour, *, w=_W, h=_H, size=10.5):
    """Draw a rounded box centred on (x, y) and return its edges."""
    patch = FancyBboxPatch(
        (x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.02,rounding_size=0.12", fc=_COLOURS[colour], ec="0.25"
    )
    ax.add_patch(patch)
    ax.text(x, y, text, ha="center", va="center", fontsize=size, linespacing=1.35)
    return {"l": (x - w / 2, y), "r": (x + w / 2, y), "t": (x, y + h / 2), "b": (x, y - h / 2)}


def _arrow(ax, start, end, *, style="-|>", colour="0.2", lw=1.4, connection="arc3", **kwargs):
    ax.add_patch(
        FancyArrowPatch(
            start, end, arrowstyle=style, mutation_scale=14, color=colour, lw=lw, connectionstyle=connection, **kwargs
        )
    )


def _agent(ax, a: int, y_cat: float, y_state: float) -> dict:
    """Draw one agent; its categorical lane at ``y_cat``, its state lane at ``y_state``. Return its boxes."""
    top, bottom = max(y_cat, y_state) + 0.85, min(y_cat, y_state) - 0.85
    ax.add_patch(
        FancyBboxPatch(
            (2.45, bottom), 9.9, top - bottom, boxstyle="round,pad=0.02,rounding_size=0.2", fc="white", ec="0.6",
            ls="--",
        )
    )  # fmt: skip
    label_y = top - 0.25 if y_state > y_cat else bottom + 0.25
    ax.text(2.6, label_y, f"agent {a}", ha="left", va="center", fontsize=11, weight="bold", color="0.3")
    boxes = {
        "view": _box(ax, 3.7, y_cat, f"view $\\tilde{{x}}_{a}$\n(augmentation)", "view"),
        "trunk": _box(ax, 6.0, y_cat, f"encoder\n$h_{a}(\\tilde{{x}}_{a})$", "cat"),
        "cat": _box(ax, 8.35, y_cat, f"categorical head\n$q_{a}(c \\mid \\tilde{{x}}_{a})$", "cat"),
        "senc": _box(ax, 6.0, y_state, f"state encoder\n$g_{a}(x)$", "state"),
        "state": _box(ax, 8.35, y_state, f"state head\n$q_{a}(s \\mid x, c)$", "state"),
        "dec": _box(ax, 11.1, y_state, f"decoder\n$p_{a}(x \\mid [c;\\, c \\otimes s])$", "decoder", w=2.2),
    }
    _arrow(ax, boxes["view"]["r"], boxes["trunk"]["l"])
    _arrow(ax, boxes["trunk"]["r"], boxes["cat"]["l"])
    _arrow(ax, boxes["senc"]["r"], boxes["state"]["l"])
    toward = "t" if y_state > y_cat else "b"
    away = "b" if toward == "t" else "t"
    _arrow(ax, boxes["cat"][toward], boxes["state"][away])
    ax.text(8.45, (y_cat + y_state) / 2, "$c$", ha="left", va="center", fontsize=11)
    _arrow(ax, boxes["state"]["r"], boxes["dec"]["l"])
    ax.text(9.7, y_state + 0.1, "$s$", ha="center", va="bottom", fontsize=11)
    corner = (boxes["cat"]["r"][0], y_cat + (0.3 if toward == "t" else -0.3))
    _arrow(ax, corner, (boxes["dec"][away][0] - 0.4, boxes["dec"][away][1]), connection="arc3,rad=0.0")
    return boxes


def draw_diagram(path: Path) -> None:
    """Draw the model: A agents (two drawn), their views, heads and decoders, the coupling and the consensus."""
    fig, ax = plt.subplots(figsize=(13.0, 7.2))
    ax.set_xlim(0, 15.6)
    ax.set_ylim(0, 9.0)
    ax.set_axis_off()
    cell = _box(ax, 1.05, 4.5, "cell $x$\n(counts)", "cell", w=1.5)
    agent1 = _agent(ax, 1, y_cat=5.55, y_state=7.45)
    agent2 = _agent(ax, 2, y_cat=3.45, y_state=1.55)
    for agent, sign in ((agent1, 1), (agent2, -1)):
        _arrow(ax, (cell["r"][0], 4.5 + 0.2 * sign), agent["view"]["l"])
        # each agent's state encoder reads the real cell, not its view
        _arrow(ax, cell["t"] if sign > 0 else cell["b"], agent["senc"]["l"], connection="angle,angleA=90,angleB=0")
    ax.text(0.95, 6.5, "real cell", ha="right", va="center", fontsize=9.5, rotation=90, color="0.3")
    ax.text(0.95, 2.5, "real cell", ha="right", va="center", fontsize=9.5, rotation=90, color="0.3")
    # the coupling between the agents' categorical posteriors
    _arrow(ax, agent1["cat"]["b"], agent2["cat"]["t"], style="<|-|>", colour="#c0392b", lw=2.2)
    ax.text(
        8.2, 4.5, "coupling $\\lambda\\, D_{12}$", ha="right", va="center", fontsize=10.5, color="#c0392b",
        weight="bold",
    )  # fmt: skip
    consensus = _box(
        ax, 14.05, 4.5, "consensus\n$\\bar{q}(c) = \\mathrm{mean}_a\\, q_a(c)$\ntype $= \\arg\\max_c \\bar{q}(c)$",
        "consensus", w=2.75, h=1.45, size=10.5,
    )  # fmt: skip
    for agent in (agent1, agent2):
        start = agent["cat"]["r"]
        _arrow(ax, (start[0], start[1] + (-0.25 if agent is agent1 else 0.25)), consensus["l"], colour="#c0392b")
    for agent in (agent1, agent2):  # the decoders reconstruct the real cell, not the agent's view
        x, y = agent["dec"]["r"]
        _arrow(ax, (x, y), (x + 0.55, y))
        ax.text(x + 0.65, y, "reconstruction\nof the real cell $x$", ha="left", va="center", fontsize=9.5)
    ax.text(
        7.8, 8.75, "$A$ agents (n_agents, 2 by default) with no shared weights; two are drawn",
        ha="center", va="center", fontsize=11.5,
    )  # fmt: skip
    ax.text(
        7.8, 0.25,
        "loss $= \\sum_a [\\mathrm{Rec}_a + \\beta\\,\\mathrm{KL}_a]$ + coupling $\\lambda \\sum_{a<b} D_{ab}$"
        "  (+ entropy terms);   read-outs: type = consensus, state = $q_1(s \\mid x, \\mathrm{type})$",
        ha="center", va="center", fontsize=10.5, color="0.2",
    )  # fmt: skip
    fig.savefig(path, bbox_inches="tight", pad_inches=0.05)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ the fit
def fit():
    """Fit the default model (it chooses the number of types) on simulated data; return the data and the model."""
    import scvi
    import torch

    import scmixvae

    torch.set_num_threads(1)
    scvi.settings.seed = SEED
    adata = scmixvae.data.simulate(n_cells=2000, n_genes=500, n_types=6, seed=SEED)
    scmixvae.model.CplMixVAE.setup_anndata(adata)
    model = scmixvae.model.CplMixVAE(adata)  # no n_categories: starts from many categories and prunes them
    model.train(n_restarts=1, enable_progress_bar=False)  # default epochs, one restart
    scmixvae.tl.annotate(adata, model)
    return adata, model


def draw_k_choice(model, path: Path) -> None:
    """Number of categories against mean consensus, one point per pruning round (``model.pruning_history``)."""
    history = model.pruning_history
    threshold = float(history.attrs.get("threshold", 0.95))
    fig, ax = plt.subplots(figsize=(6.4, 4.2), layout="constrained")
    k, consensus = history["n_categories"].to_numpy(), history["mean_consensus"].to_numpy(dtype=float)
    ax.plot(k, consensus, "-o", color="C0", lw=1.6, ms=6, zorder=2)
    for r, x, y in zip(history["round"], k, consensus, strict=True):
        ax.annotate(str(r), (x, y), xytext=(0, 10), textcoords="offset points", ha="center", fontsize=9, color="0.3")
    chosen = history[history["selected"]]
    ax.scatter(chosen["n_categories"], chosen["mean_consensus"], s=190, facecolors="none", edgecolors="C3", lw=2,
               zorder=3, label=f"kept: K = {int(chosen['n_categories'].iloc[0])}")  # fmt: skip
    ax.axhline(threshold, color="0.4", ls="--", lw=1, label=f"threshold {threshold:g}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.invert_xaxis()  # rounds run left to right as categories are pruned
    ax.set_xlabel("categories K (pruning rounds run left to right)")
    ax.set_ylabel("mean consensus of the agents")
    ax.set_ylim(min(0.0, consensus.min() - 0.05), 1.1)
    ax.set_title("Choosing the number of types (labels: round)")
    ax.legend(loc="lower right", fontsize=10)
    fig.savefig(path)
    plt.close(fig)


def draw_state_traversal(adata, model, path: Path) -> None:
    """The decoded expression of the largest type's top state genes along its state axis."""
    import scmixvae

    scmixvae.tl.rank_state_genes(adata, model)
    category = str(adata.obs["cplmixvae_type"].value_counts().idxmax())
    cells = adata.obs["cplmixvae_type"] == category
    simulated = str(adata.obs.loc[cells, "type"].value_counts().idxmax())
    true_genes = set(adata.uns["simulation"]["state_genes"][simulated])
    fig = scmixvae.pl.state_traversal_heatmap(adata, category, n_genes=15, return_fig=True)
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    ax.set_yticks(range(len(labels)), [f"{g} *" if g in true_genes else g for g in labels])
    hits = sum(g in true_genes for g in labels)
    ax.set_title(f"category {category} (simulated {simulated}):\ntop state genes, {hits}/{len(labels)} simulated (*)")
    fig.set_size_inches(6.4, 5.6)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    print(f"state traversal: category {category} ~ {simulated}, {hits}/{len(labels)} top genes simulated")


def main() -> None:
    """Write the three figures into docs/_static/."""
    draw_diagram(OUT / "model_diagram.png")
    adata, model = fit()
    from sklearn.metrics import adjusted_rand_score

    ari = adjusted_rand_score(adata.obs["type"], adata.obs["cplmixvae_type"])
    print(f"fit: K = {model.n_categories}, ARI with the simulated types {ari:.3f}")
    columns = ["round", "n_categories", "mean_consensus", "selected"]
    print(pd.DataFrame(model.pruning_history[columns]).to_string(index=False))
    draw_k_choice(model, OUT / "k_choice.png")
    draw_state_traversal(adata, model, OUT / "state_traversal.png")
    for name in ("model_diagram.png", "k_choice.png", "state_traversal.png"):
        print(f"wrote {OUT / name} ({(OUT / name).stat().st_size / 1024:.0f} KB)")


if __name__ == "__main__":
    main()
