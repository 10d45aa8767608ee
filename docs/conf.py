"""Sphinx configuration of the scmixvae documentation."""

from importlib.metadata import version as _version

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
napoleon_numpy_docstring = True
nb_execution_mode = "off"  # notebooks are committed with outputs and rendered, not re-executed
myst_enable_extensions = ["dollarmath", "colon_fence"]
intersphinx_mapping = {
    "python": ("https://docs.python.org/3", None),
    "anndata": ("https://anndata.readthedocs.io/en/stable/", None),
    "scanpy": ("https://scanpy.readthedocs.io/en/stable/", None),
    "scvi": ("https://docs.scvi-tools.org/en/stable/", None),
}
exclude_patterns = ["_build"]
html_theme = "alabaster"
