"""Command line: ``scmixvae demo`` and ``scmixvae fit``."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

logger = logging.getLogger("scmixvae")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scmixvae", description="Cell types and within-type states (cpl-mixVAE).")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="fit the model on built-in simulated data and write results and a figure")
    demo.add_argument("-o", "--output", type=Path, default=Path("scmixvae_demo"), help="output folder")
    demo.add_argument("--n-cells", type=int, default=3000)
    demo.add_argument("--n-genes", type=int, default=1000)
    demo.add_argument("--n-types", type=int, default=8)
    demo.add_argument("--max-epochs", type=int, default=None, help="training epochs (default: the model's)")
    demo.add_argument("--state-epochs", type=int, default=None, help="state-phase epochs (default: the model's)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--accelerator", default="auto")
    demo.add_argument("--quiet", action="store_true", help="no progress bar")

    fit = sub.add_parser("fit", help="fit the model on an .h5ad file of raw counts and write the annotated file")
    fit.add_argument("input", type=Path, help="input .h5ad with raw counts")
    fit.add_argument("-o", "--output", type=Path, required=True, help="output .h5ad")
    fit.add_argument("--layer", default=None, help="layer with the raw counts (default: X)")
    fit.add_argument("--batch-key", default=None, help="obs column of the batch")
    fit.add_argument(
        "--condition-key",
        default=None,
        help="obs column of an experimental condition (e.g. control vs stimulated) whose effect the states carry",
    )
    fit.add_argument(
        "--n-categories",
        type=int,
        default=None,
        help="number of categories (the maximum with --prune); default: start from up to 50 and prune",
    )
    fit.add_argument("--prune", action="store_true", help="prune --n-categories and choose the number of types")
    fit.add_argument("--consensus-threshold", type=float, default=0.95, help="consensus criterion of --prune")
    fit.add_argument(
        "--restarts",
        type=int,
        default=None,
        help="fits to choose the types from, keeping the medoid (default: 3 without --n-categories on <= 50,000 cells)",
    )
    fit.add_argument("--n-state-genes", type=int, default=20, help="state genes per type in the summary table")
    fit.add_argument(
        "--likelihood",
        default=None,
        choices=["nb", "zinb", "gaussian"],
        help="default: the model's (gaussian)",
    )
    fit.add_argument("--max-epochs", type=int, default=None)
    fit.add_argument("--state-epochs", type=int, default=None, help="state-phase epochs (default: the model's)")
    fit.add_argument("--batch-size", type=int, default=None)
    fit.add_argument("--accelerator", default="auto")
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--key-added", default="cplmixvae")
    fit.add_argument("--figures", type=Path, default=None, help="folder for figures")
    fit.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def _train_kwargs(args) -> dict:
    kwargs = {"accelerator": args.accelerator, "enable_progress_bar": not args.quiet}
    if args.max_epochs is not None:
        kwargs["max_epochs"] = args.max_epochs
    if args.state_epochs is not None:
        kwargs["state_epochs"] = args.state_epochs
    if getattr(args, "batch_size", None) is not None:
        kwargs["batch_size"] = args.batch_size
    return kwargs


def _figure(adata, key: str, path: Path, truth: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    from . import pl
    from ._constants import state_key, type_key

    types = adata.obs[type_key(key)]
    ncols = 2 if truth is None else 3
    fig, axes = plt.subplots(1, ncols, figsize=(5 * ncols, 4.5))
    components = (0, 1) if adata.obsm[state_key(key)].shape[1] > 1 else (0, 0)
    pl.embedding(adata, basis=state_key(key), color=type_key(key), components=components, ax=axes[0], show=False)
    axes[0].set_title("state latent, by consensus type")
    confidence = adata.obs[f"{key}_confidence"].to_numpy()
    axes[1].hist(confidence, bins=30, color="0.3")
    axes[1].set(title="consensus confidence", xlabel="mean posterior on the consensus type", ylabel="cells")
    if truth is not None:
        table = pd.crosstab(adata.obs[truth], types, normalize="index")
        im = axes[2].imshow(table.to_numpy(), cmap="Blues", vmin=0, vmax=1, aspect="auto")
        axes[2].set(title="truth vs consensus type", xlabel="consensus type", ylabel=truth)
        axes[2].set_xticks(range(table.shape[1]), table.columns, fontsize="small")
        axes[2].set_yticks(range(table.shape[0]), table.index, fontsize="small")
        fig.colorbar(im, ax=axes[2], fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _demo(args) -> int:
    import scvi
    from sklearn.metrics import adjusted_rand_score

    from . import tl
    from .data import simulate
    from .model import CplMixVAE

    args.output.mkdir(parents=True, exist_ok=True)
    scvi.settings.seed = args.seed
    adata = simulate(n_cells=args.n_cells, n_genes=args.n_genes, n_types=args.n_types, seed=args.seed)
    CplMixVAE.setup_anndata(adata)
    model = CplMixVAE(adata, n_categories=args.n_types)
    model.train(**_train_kwargs(args))
    tl.annotate(adata, model)
    ari = adjusted_rand_score(adata.obs["type"], adata.obs["cplmixvae_type"])
    out = args.output / "demo.h5ad"
    adata.write_h5ad(out)
    _figure(adata, "cplmixvae", args.output / "demo.png", truth="type")
    model.save(args.output / "model", overwrite=True)
    print(f"ARI of the consensus types vs the simulated truth: {ari:.3f}")
    print(f"wrote {out}, {args.output / 'demo.png'} and {args.output / 'model'}")
    return 0


def _fit(args) -> int:
    import anndata
    import scvi

    from . import tl
    from .model import CplMixVAE

    if not args.input.is_file():
        print(f"error: input file {args.input} does not exist", file=sys.stderr)
        return 2
    if args.output.suffix != ".h5ad":
        print(f"error: output {args.output} must end in .h5ad", file=sys.stderr)
        return 2
    scvi.settings.seed = args.seed
    adata = anndata.read_h5ad(args.input)
    try:
        CplMixVAE.setup_anndata(adata, layer=args.layer, batch_key=args.batch_key, condition_key=args.condition_key)
        kwargs = {"n_categories": args.n_categories}
        if args.likelihood is not None:
            kwargs["likelihood"] = args.likelihood
        model = CplMixVAE(adata, **kwargs)
    except (ValueError, TypeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    # without --n-categories the model prunes by itself (train(prune=None)); --prune asks for it explicitly
    model.train(
        prune=True if args.prune else None,
        prune_kwargs={"threshold": args.consensus_threshold},
        n_restarts=args.restarts,
        **_train_kwargs(args),
    )
    tl.annotate(adata, model, key_added=args.key_added)
    genes_key = f"{args.key_added}_state_genes"
    tl.rank_state_genes(adata, model, key_added=genes_key)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    adata.write_h5ad(args.output)
    table = tl.get_state_genes(adata, key=genes_key, n_genes=args.n_state_genes)
    table.to_csv(args.output.with_suffix(".state_genes.csv"), index=False)
    if args.figures is not None:
        _fit_figures(adata, model, args.key_added, genes_key, args.figures)
    print(f"wrote {args.output} and {args.output.with_suffix('.state_genes.csv')}")
    return 0


def _fit_figures(adata, model, key: str, genes_key: str, folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from . import pl

    folder.mkdir(parents=True, exist_ok=True)
    _figure(adata, key, folder / "types_and_states.png")
    for name, draw in {
        "consensus": lambda: pl.consensus_heatmap(model, return_fig=True),
        "training_history": lambda: pl.training_history(model, return_fig=True),
        "state_genes_dotplot": lambda: pl.state_genes_dotplot(adata, key=genes_key, return_fig=True),
    }.items():
        fig = draw()
        fig.savefig(folder / f"{name}.png", dpi=120, bbox_inches="tight")
        plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``scmixvae`` command."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "demo":
        return _demo(args)
    return _fit(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
