"""Command line: ``scmixvae demo`` and ``scmixvae fit``.

Importing this module imports neither torch, scvi-tools nor scanpy: they are loaded by the commands, so that
``scmixvae --help`` answers at once.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import sys
import warnings
from pathlib import Path


def _int_at_least(minimum: int, maximum: int | None = None):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        if maximum is not None and value > maximum:  # Lightning's seed_everything takes numpy's 32-bit seeds
            raise argparse.ArgumentTypeError(f"must be at most {maximum}, got {value}")
        return value

    parse.__name__ = "integer"
    return parse


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def _key(text: str) -> str:
    from ._validation import check_key_added

    try:
        return check_key_added(text)
    except (TypeError, ValueError) as err:
        raise argparse.ArgumentTypeError(str(err)) from None


class _DeprecatedRestarts(argparse.Action):
    """``--restarts``: the former name of ``--n-restarts``, kept working with a warning."""

    def __call__(self, parser, namespace, values, option_string=None):
        print("scmixvae: --restarts is deprecated; use --n-restarts.", file=sys.stderr)
        setattr(namespace, self.dest, values)


def _common_options(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--max-epochs",
        type=_int_at_least(1),
        default=None,
        help="training epochs (default: the model's, which depends on the number of cells)",
    )
    command.add_argument(
        "--state-epochs", type=_int_at_least(0), default=None, help="state-phase epochs (default: the model's)"
    )
    command.add_argument("--seed", type=_int_at_least(0, 2**32 - 1), default=0, help="random seed (scvi.settings.seed)")
    command.add_argument(
        "--accelerator", default="auto", help="Lightning accelerator: auto, cpu, gpu, mps (default: auto)"
    )
    command.add_argument("--overwrite", action="store_true", help="replace output files that already exist")
    command.add_argument(
        "--quiet",
        action="store_true",
        help="no progress bar and no progress messages: only warnings, errors and the results (what was written)",
    )


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="scmixvae", description="Cell types and within-type states (cpl-mixVAE).")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="fit the model on built-in simulated data and write results and a figure")
    demo.add_argument("-o", "--output", type=Path, default=Path("scmixvae_demo"), help="output folder")
    demo.add_argument("--n-cells", type=_int_at_least(10), default=3000, help="simulated cells")
    demo.add_argument("--n-genes", type=_int_at_least(10), default=1000, help="simulated genes")
    demo.add_argument("--n-types", type=_int_at_least(2), default=8, help="simulated cell types")
    _common_options(demo)

    fit = sub.add_parser("fit", help="fit the model on an .h5ad file of raw counts and write the annotated file")
    fit.add_argument(
        "input",
        type=Path,
        help="input .h5ad with raw counts (never changed, unless named as the output with --overwrite)",
    )
    fit.add_argument(
        "-o", "--output", type=Path, required=True, help="output .h5ad (not the input, unless --overwrite)"
    )
    fit.add_argument("--layer", default=None, help="layer with the raw counts (default: X)")
    fit.add_argument("--batch-key", default=None, help="obs column of the batch")
    fit.add_argument(
        "--condition-key",
        default=None,
        help="obs column of an experimental condition (e.g. control vs stimulated) whose effect the states carry",
    )
    fit.add_argument(
        "--n-categories",
        type=_int_at_least(1),
        default=None,
        help="number of categories (the maximum with --prune); default: start from up to 50 and prune",
    )
    fit.add_argument(
        "--prune",
        action="store_true",
        help="prune --n-categories and choose the number of types (each agent then sees its own view of a cell)",
    )
    fit.add_argument(
        "--consensus-threshold",
        type=_fraction,
        default=None,
        help="consensus a pruning round must reach, in (0, 1] (default 0.95); only when the types are chosen",
    )
    fit.add_argument(
        "--n-restarts",
        type=_int_at_least(1),
        default=None,
        help="fits to choose the types from, keeping the medoid (default: 3 without --n-categories on <= 50,000 cells)",
    )
    fit.add_argument(
        "--restarts", type=_int_at_least(1), dest="n_restarts", action=_DeprecatedRestarts, help=argparse.SUPPRESS
    )
    fit.add_argument(
        "--n-state-genes", type=_int_at_least(1), default=20, help="state genes per type in the summary table"
    )
    fit.add_argument(
        "--likelihood",
        default=None,
        choices=["nb", "zinb", "gaussian"],
        help="likelihood of the counts (default: the model's, nb)",
    )
    fit.add_argument(
        "--batch-size", type=_int_at_least(2), default=None, help="cells per minibatch (default: the model's, 128)"
    )
    fit.add_argument(
        "--key-added",
        type=_key,
        default="cplmixvae",
        help="prefix of the results in the output: obs[KEY_type], obsm[X_KEY_state], uns[KEY] (default: cplmixvae)",
    )
    fit.add_argument("--figures", type=Path, default=None, help="folder for figures")
    fit.add_argument("--save-model", type=Path, default=None, metavar="DIR", help="folder to save the trained model in")
    _common_options(fit)
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
    _save_figure(fig, path)


def _save_figure(fig, path: Path, **kwargs) -> None:
    import matplotlib.pyplot as plt

    from ._io import atomic_write

    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, **kwargs))
    finally:
        plt.close(fig)


#: The API's arguments that the package's messages name, and the command's options that set them.
_OPTIONS = {
    name: "--" + name.replace("_", "-")
    for name in ("layer", "batch_key", "condition_key", "n_categories", "n_restarts", "likelihood", "batch_size",
                 "key_added", "max_epochs", "state_epochs", "accelerator")
}  # fmt: skip


def _in_command_words(message: str) -> str:
    """Name the command's options where a message of the package names the API's arguments.

    ``batch_key``/`` `batch_key` `` becomes ``--batch-key``, `` `layer=` `` ``--layer``, ``layer=None`` ``no --layer``
    and ``n_categories=400`` ``--n-categories 400``.
    """
    for name, option in _OPTIONS.items():
        message = re.sub(rf"`{name}=?`", option, message)
        message = re.sub(rf"\b{name}=None\b", f"no {option}", message)
        message = re.sub(rf"\b{name}=(['\"]?)([^\s,;:()'\"]+)\1", rf"{option} \2", message)
    return message


def _error(message: str) -> int:
    print(f"scmixvae: error: {_in_command_words(message)}", file=sys.stderr)
    return 2


def _check_outputs(files: list[Path], folders: list[Path], *, inputs: list[Path], overwrite: bool) -> str | None:
    """Why the planned outputs cannot be written (checked before any work); ``None`` when they can."""
    from ._io import unwritable_reason

    for folder in folders:  # model.save refuses a folder that the outputs, written first, created or filled
        for path in files:
            if path.resolve() == folder.resolve() or folder.resolve() in path.resolve().parents:
                return f"the model folder {folder} would hold the output {path}; give the model a folder of its own"
    for path in files:  # e.g. --figures naming the output file: it failed after the fit, half the files written
        for other in files + folders:
            if other is not path and (path.resolve() == other.resolve() or path.resolve() in other.resolve().parents):
                return f"the outputs {path} and {other} collide (one is, or lies in, the other); give each its own path"
    for path in files + folders:
        same_as_input = any(path.exists() and src.exists() and os.path.samefile(path, src) for src in inputs)
        if same_as_input and path in folders:
            return f"model folder {path} is the input file; choose a folder for the model"
        if same_as_input and not overwrite:
            return f"output {path} is the input file; write to another file, or pass --overwrite to replace the input"
        if path.exists() and not overwrite:
            return f"{path} already exists; choose another output or pass --overwrite to replace it"
        if path in folders and path.exists() and not path.is_dir():
            return f"{path} exists and is not a folder"
        reason = unwritable_reason(path / "file" if path in folders else path)
        if reason is not None:
            return f"cannot write {path}: {reason}"
    return None


def _device_problem(accelerator: str) -> str | None:
    """Why Lightning cannot train on ``accelerator`` here (checked before the input is read); ``None`` if it can."""
    from .model._fit import check_devices

    try:
        check_devices(accelerator, "auto")
    except ValueError as err:
        return str(err)
    return None


def _read_input(path: Path):
    """Read the input .h5ad, or return the message that says why it cannot be read."""
    import anndata

    from ._io import not_hdf5_reason

    if path.is_dir():
        return f"input {path} is a folder; give an .h5ad file"
    if not path.is_file():
        return f"input file {path} does not exist"
    if (reason := not_hdf5_reason(path)) is not None:
        return f"input {reason}"
    try:
        with warnings.catch_warnings():  # setup refuses duplicate names, saying how to fix them
            warnings.filterwarnings("ignore", message="(Variable|Observation) names are not unique")
            return anndata.read_h5ad(path)
    except Exception as err:  # any reader failure: the file is not an AnnData anndata can read
        return f"input {path} could not be read as an AnnData ({type(err).__name__}: {err})"


def _demo(args) -> int:
    out = args.output
    planned = [out / "demo.h5ad", out / "demo.png"]
    problem = _check_outputs(planned, [out / "model"], inputs=[], overwrite=args.overwrite)
    problem = problem or _device_problem(args.accelerator)
    if problem is not None:
        return _error(problem)
    import numpy as np
    import scvi
    from sklearn.metrics import adjusted_rand_score

    from . import tl
    from ._io import write_h5ad
    from .data import simulate
    from .model import CplMixVAE

    out.mkdir(parents=True, exist_ok=True)
    _scvi_settings(scvi, args)
    adata = simulate(n_cells=args.n_cells, n_genes=args.n_genes, n_types=args.n_types, seed=args.seed)
    adata = adata[:, np.asarray(adata.X.sum(0)).ravel() > 0].copy()  # as a user filters genes before the fit
    CplMixVAE.setup_anndata(adata)
    model = CplMixVAE(adata, n_categories=args.n_types)
    model.train(**_train_kwargs(args))
    if model.interrupted_:
        raise KeyboardInterrupt
    tl.annotate(adata, model)
    ari = adjusted_rand_score(adata.obs["type"], adata.obs["cplmixvae_type"])
    write_h5ad(adata, planned[0])
    _figure(adata, "cplmixvae", planned[1], truth="type")
    model.save(out / "model", overwrite=args.overwrite)
    print(f"ARI of the consensus types vs the simulated truth: {ari:.3f}")
    print(f"wrote {planned[0]}, {planned[1]} and {out / 'model'}")
    return 0


_FIGURES = ("types_and_states", "consensus", "training_history", "state_genes_dotplot")


def _fit_outputs(args) -> tuple[list[Path], list[Path]]:
    files = [args.output, args.output.with_suffix(".state_genes.csv")]
    if args.figures is not None:
        files += [args.figures / f"{name}.png" for name in _FIGURES]
    return files, [] if args.save_model is None else [args.save_model]


def _scvi_settings(scvi, args) -> None:
    """Set the command's seed and, with ``--quiet``, scvi-tools' verbosity (which scmixvae follows) to WARNING."""
    if args.quiet:
        scvi.settings.verbosity = logging.WARNING
    from ._logging import quiet_fit

    with quiet_fit():  # as in a fit: Lightning's "Seed set to ..." notice repeats the command's own --seed
        scvi.settings.seed = args.seed


def _choice_option_without_choice(args) -> str | None:
    """Return the option of the choice of the number of types given to a fit that keeps --n-categories, if any."""
    if args.n_categories is None or args.prune:
        return None
    if args.consensus_threshold is not None:
        return "--consensus-threshold"
    if args.n_restarts is not None and args.n_restarts > 1:
        return "--n-restarts"
    return None


def _fit(args) -> int:
    if args.output.suffix != ".h5ad":
        return _error(f"output {args.output} must end in .h5ad")
    if (option := _choice_option_without_choice(args)) is not None:
        return _error(
            f"{option} applies when the number of types is chosen; --n-categories without --prune keeps that "
            "number (add --prune, or leave out --n-categories)"
        )
    files, folders = _fit_outputs(args)
    problem = _check_outputs(files, folders, inputs=[args.input], overwrite=args.overwrite)
    problem = problem or _device_problem(args.accelerator)
    if problem is not None:
        return _error(problem)
    adata = _read_input(args.input)
    if isinstance(adata, str):
        return _error(adata)

    import scvi

    from . import tl
    from ._io import atomic_write, write_h5ad
    from .model import CplMixVAE
    from .model._fit import PUBLISHED_INPUT_DROPOUT
    from .train import TrainingDivergedError

    _scvi_settings(scvi, args)
    try:
        CplMixVAE.setup_anndata(adata, layer=args.layer, batch_key=args.batch_key, condition_key=args.condition_key)
        kwargs = {"n_categories": args.n_categories}
        if args.prune and args.n_categories is not None:  # pruning needs agents that see different views
            kwargs["input_dropout"] = PUBLISHED_INPUT_DROPOUT
        if args.likelihood is not None:
            kwargs["likelihood"] = args.likelihood
        model = CplMixVAE(adata, **kwargs)
        # without --n-categories the model prunes by itself (train(prune=None)); --prune asks for it explicitly
        model.train(
            prune=True if args.prune else None,
            prune_kwargs=None if args.consensus_threshold is None else {"threshold": args.consensus_threshold},
            n_restarts=args.n_restarts,
            **_train_kwargs(args),
        )
    except (ValueError, TypeError, TrainingDivergedError) as err:
        return _error(str(err))
    if model.interrupted_:  # train() kept the partial fit for Python users; the command writes nothing
        raise KeyboardInterrupt
    tl.annotate(adata, model, key_added=args.key_added)
    genes_key = f"{args.key_added}_state_genes"
    try:
        tl.rank_state_genes(adata, model, key_added=genes_key)
    except ValueError as err:  # e.g. too few cells in every type: say so, as for any input error
        return _error(f"the fit ran, but its state genes could not be ranked, so nothing was written: {err}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    write_h5ad(adata, args.output)
    table = tl.get_state_genes(adata, key=genes_key, n_genes=args.n_state_genes)
    atomic_write(files[1], lambda tmp: table.to_csv(tmp, index=False))
    if args.figures is not None:
        _fit_figures(adata, model, args.key_added, genes_key, args.figures)
    if args.save_model is not None:
        model.save(args.save_model, overwrite=args.overwrite)
    figures = f" and figures in {args.figures}" if args.figures else ""
    print(f"wrote {', '.join(str(p) for p in files[:2] + folders)}{figures}")
    return 0


def _fit_figures(adata, model, key: str, genes_key: str, folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")

    from . import pl

    folder.mkdir(parents=True, exist_ok=True)
    _figure(adata, key, folder / "types_and_states.png")
    for name, draw in {
        "consensus": lambda: pl.consensus_heatmap(model, return_fig=True),
        "training_history": lambda: pl.training_history(model, return_fig=True),
        "state_genes_dotplot": lambda: pl.state_genes_dotplot(adata, key=genes_key, return_fig=True),
    }.items():
        _save_figure(draw(), folder / f"{name}.png", bbox_inches="tight")


def _format_warning(message, category, filename, lineno, line=None) -> str:
    """Format a warning as the command's message, ``scmixvae: warning: ...``, not with a source file and line."""
    return f"scmixvae: warning: {_in_command_words(str(message))}\n"


class _CommandFormatter(logging.Formatter):
    """Format the package's log records as the command's messages: ``scmixvae: ...``, ``scmixvae: warning: ...``."""

    def format(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno < logging.WARNING else f"{record.levelname.lower()}: "
        return f"scmixvae: {level}{record.getMessage()}"


@contextlib.contextmanager
def _command_messages():
    """Show the package's log lines as the command's own, on stderr beside its warnings, without terminal colours.

    They otherwise reach scvi-tools' console handler, which writes them to stdout (where the command's results go)
    with colour codes and wrapped at 80 columns, also into a file. Their level still follows ``--quiet``.
    """
    logger = logging.getLogger("scmixvae")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_CommandFormatter())
    propagate = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``scmixvae`` command."""
    args = _parser().parse_args(argv)
    formatwarning, warnings.formatwarning = warnings.formatwarning, _format_warning
    caller = _caller_settings()
    try:
        with warnings.catch_warnings(), _command_messages():
            warnings.filterwarnings("ignore", message="Training was interrupted", category=UserWarning)  # said below
            return _demo(args) if args.command == "demo" else _fit(args)
    except KeyboardInterrupt:
        print("scmixvae: interrupted; no output file was replaced by a partial one.", file=sys.stderr)
        return 130
    finally:  # main is also called in-process (tests, notebooks): give the caller its own settings back
        warnings.formatwarning = formatwarning
        _restore_caller_settings(caller)


def _caller_settings() -> dict:
    """Return what the command changes in-process: scvi-tools' seed and verbosity, matplotlib's backend if used.

    The seed comes with the flags scvi-tools' seed setter changes besides (:func:`~.model._fit.seed_settings`).
    """
    import scvi

    from .model._fit import seed_settings

    matplotlib = sys.modules.get("matplotlib")
    backend = matplotlib.get_backend() if matplotlib is not None else None
    return {"seed": seed_settings(), "verbosity": scvi.settings.verbosity, "backend": backend}


def _restore_caller_settings(caller: dict) -> None:
    import scvi

    from ._logging import quiet_fit
    from .model._fit import restore_seed_settings

    with quiet_fit():  # no "Seed set to ..." notice for the caller's own seed
        restore_seed_settings(caller["seed"])
    if scvi.settings.verbosity != caller["verbosity"]:
        scvi.settings.verbosity = caller["verbosity"]
    if caller["backend"] is not None and sys.modules["matplotlib"].get_backend() != caller["backend"]:
        import matplotlib.pyplot as plt

        plt.switch_backend(caller["backend"])


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
