"""The documentation: the Sphinx build passes with warnings as errors, and the API page lists every public name."""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SUBPACKAGES = ["model", "module", "train", "tl", "pl", "data"]


def _public_names() -> list[str]:
    return [f"{sub}.{name}" for sub in SUBPACKAGES for name in importlib.import_module(f"scmixvae.{sub}").__all__]


def test_api_page_lists_every_public_name():
    listed = set(re.findall(r"^\s+(\w+\.\w+)\s*$", (DOCS / "api.md").read_text(), flags=re.MULTILINE))
    listed |= set(re.findall(r"py:data:: scmixvae\.(\w+\.\w+)", (DOCS / "api.md").read_text()))
    missing = [name for name in _public_names() if name not in listed]
    assert not missing, f"add these public names to docs/api.md: {missing}"


def test_tutorials_page_includes_every_notebook():
    text = (DOCS / "tutorials.md").read_text()
    assert ":glob:" in text and "tutorials/*" in text
    assert list((ROOT / "tutorials").glob("*.ipynb")), "no tutorials to include"


def _user_guide_figures() -> list[tuple[Path, str]]:
    """(image, caption) of every ``{figure}`` directive in the user guide."""
    found = []
    for page in sorted((DOCS / "user_guide").glob("*.md")):
        for target, body in re.findall(r"```\{figure\} (\S+)\n(.*?)```", page.read_text(), flags=re.DOTALL):
            found.append(((page.parent / target).resolve(), body))
    return found


def test_user_guide_figures_are_committed_small_and_reproducible():
    figures = _user_guide_figures()
    names = {image.name for image, _ in figures}
    assert {"model_diagram.png", "k_choice.png", "state_traversal.png"} <= names
    script = (DOCS / "_static" / "make_figures.py").read_text()
    for image, caption in figures:
        assert image.is_file(), f"{image} is referenced but missing"
        assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", image.name
        assert image.stat().st_size < 300 * 1024, f"{image.name} is over 300 KB"
        assert f'"{image.name}"' in script, f"make_figures.py does not write {image.name}"
        assert "python docs/_static/make_figures.py" in caption, f"the caption of {image.name} names no command"
        assert ":alt:" in caption, f"{image.name} has no alt text"


@pytest.mark.slow
def test_sphinx_build_passes_with_warnings_as_errors(tmp_path):
    for module in ("sphinx", "myst_nb", "sphinx_book_theme"):
        pytest.importorskip(module, reason=f"building the docs needs {module} (pip install -e '.[doc]')")
    env = {
        **{key: value for key, value in os.environ.items() if key != "SCMIXVAE_DOCS_OFFLINE"},
        # as offline whatever the machine: every intersphinx fetch fails at once, and the build must still pass
        "HTTP_PROXY": "http://127.0.0.1:9",
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "NO_PROXY": "",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "OMP_NUM_THREADS": "1",
        "MPLBACKEND": "Agg",
    }
    html = tmp_path / "html"
    command = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-E", "-q", "-b", "html"]
    command += ["-d", str(tmp_path / "doctrees"), str(DOCS), str(html)]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"sphinx-build -W failed:\n{result.stdout[-5000:]}\n{result.stderr[-5000:]}"
    assert "failed to reach any of the inventories" not in result.stderr
    for name in _public_names():
        assert (html / "generated" / f"scmixvae.{name}.html").is_file() or name == "data.DATASETS", name
    assert "scmixvae.data.DATASETS" in (html / "api.html").read_text()
    for notebook in (ROOT / "tutorials").glob("*.ipynb"):
        page = (html / "tutorials" / f"{notebook.stem}.html").read_text()
        assert "<img" in page, f"{notebook.name} is rendered without its figures"
    assert "Unreleased" in (html / "changelog.html").read_text()
    for page in ("installation", "user_guide/model", "tutorials", "api"):
        assert (html / f"{page}.html").is_file()
    assert (html / "_static" / "styles" / "sphinx-book-theme.css").is_file(), "not built with sphinx-book-theme"
    model_page = (html / "user_guide" / "model.html").read_text()
    for image, _ in _user_guide_figures():
        assert (html / "_images" / image.name).is_file() and image.name in model_page, image.name
