"""Sphinx configuration of the scmixvae documentation.

Build with ``python -m sphinx -W -b html docs docs/_build/html``. The tutorials in ``../tutorials/*.ipynb`` are
copied into ``docs/tutorials/`` (git-ignored) at every build and rendered with their committed outputs; they are
never executed here. ``SCMIXVAE_DOCS_OFFLINE=1`` turns off intersphinx, so that the build reads nothing from the
network (the test suite builds this way).
"""

import os
import shutil
from importlib.metadata import version as _version
from pathlib import Path

_DOCS = Path(__file__).resolve().parent
_TUTORIALS = _DOCS.parent / "tutorials"


def _copy_tutorials() -> None:
    """Mirror ``../tutorials/*.ipynb`` into ``docs/tutorials/`` (Sphinx only reads files under its source folder)."""
    target = _DOCS / "tutorials"
    target.mkdir(exist_ok=True)
    sources = {path.name: path for path in sorted(_TUTORIALS.glob("*.ipynb"))}
    for stale in target.glob("*.ipynb"):
        if stale.name not in sources:
            stale.unlink()
    for name, source in sources.items():
        copy = target / name
        if not copy.is_file() or copy.read_bytes() != source.read_bytes():
            shutil.copy2(source, copy)


_copy_tutorials()

project = "scmixvae"
author = "scmixvae developers"
release = _version("scmixvae")
extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.intersphinx",
    "sphinx.ext.mathjax",
]
autosummary_generate = True
autodoc_typehints = "description"
autodoc_member_order = "bysource"
napoleon_numpy_docstring = True
# The package writes "Returns" as prose (types are in the signatures); render it as such instead of as
# "type : description" items.
napoleon_custom_sections = ["Returns"]
nb_execution_mode = "off"  # notebooks are committed with outputs and rendered, not re-executed
myst_enable_extensions = ["dollarmath", "colon_fence"]
myst_heading_anchors = 3
intersphinx_mapping = {
    "python": ("https://docs.python.org/3", None),
    "anndata": ("https://anndata.readthedocs.io/en/stable/", None),
    "scanpy": ("https://scanpy.readthedocs.io/en/stable/", None),
    "scvi": ("https://docs.scvi-tools.org/en/stable/", None),
}
if os.environ.get("SCMIXVAE_DOCS_OFFLINE"):
    intersphinx_mapping = {}
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints"]
html_theme = "alabaster"
html_static_path = ["_static"]
