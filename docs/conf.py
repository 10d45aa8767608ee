"""Sphinx configuration of the scmixvae documentation.

Build with ``python -m sphinx -W -b html docs docs/_build/html``. The tutorials in ``../tutorials/*.ipynb`` are
copied into ``docs/tutorials/`` (git-ignored) at every build and rendered with their committed outputs; they are
never executed here. Cross-references to Python, AnnData, scanpy and scvi-tools come from their intersphinx
inventories when the network reaches them; offline, each falls back to an empty local inventory, so the build
(``-W`` included) passes without them and only those links are missing. ``SCMIXVAE_DOCS_OFFLINE=1`` skips the
fetch altogether.
"""

import importlib.util
import os
import shutil
import tempfile
import zlib
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


def _check_doc_extra() -> None:
    """Fail with the install command when the doc extra is missing (Sphinx would only name the extension)."""
    missing = [name for name in ("myst_nb", "sphinx_book_theme") if importlib.util.find_spec(name) is None]
    if missing:
        raise RuntimeError(f"building the docs needs {', '.join(missing)}: pip install -e '.[doc]'")


def _empty_inventory() -> str:
    """Write a valid intersphinx inventory with no entries; the fallback of every mapping when offline."""
    header = b"# Sphinx inventory version 2\n# Project: none\n# Version: \n"
    header += b"# The remainder of this file is compressed using zlib.\n"
    path = Path(tempfile.mkdtemp(prefix="scmixvae-docs-")) / "empty.inv"
    path.write_bytes(header + zlib.compress(b""))
    return str(path)


_check_doc_extra()
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
_INVENTORIES = {
    "python": "https://docs.python.org/3",
    "anndata": "https://anndata.readthedocs.io/en/stable/",
    "scanpy": "https://scanpy.readthedocs.io/en/stable/",
    "scvi": "https://docs.scvi-tools.org/en/stable/",
}
# Sphinx tries each location in turn and warns only when all fail: the empty inventory makes an unreachable site
# a missing link, not a failed -W build.
_EMPTY = _empty_inventory()
intersphinx_mapping = {name: (url, (None, _EMPTY)) for name, url in _INVENTORIES.items()}
intersphinx_timeout = 10
if os.environ.get("SCMIXVAE_DOCS_OFFLINE"):
    intersphinx_mapping = {}
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints"]
# The scverse theme (as the scverse cookiecutter's): sphinx-book-theme on pydata-sphinx-theme. Its fonts, icons and
# scripts ship with the package, and with no repository, launch buttons, version switcher or analytics set it
# fetches nothing at build time; the pages load only MathJax from its CDN, as before.
html_theme = "sphinx_book_theme"
html_title = project
html_theme_options = {
    "navigation_with_keys": False,  # arrow keys scroll the page instead of jumping to the next one
    "show_toc_level": 2,  # the page's sections in the right-hand table of contents
    "home_page_in_toc": True,
    "use_download_button": True,
    "use_fullscreen_button": False,
}
pygments_style = "default"
html_static_path = ["_static"]
