from __future__ import annotations

import functools
import logging
import threading
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import scmixvae.data._datasets as datasets
from scmixvae._constants import DATA_DIR_ENV
from scmixvae.data import (
    data_dir,
    human_kidney,
    ifnb,
    mouse_bladder,
    pbmc68k_counts,
    pbmc_10x,
    read_counts,
    read_scdcc_h5,
    worm_neuron,
)

SHARED_DATA = Path(__file__).parents[2] / "shared" / "data"

# loader, file, (cells, genes), number of reference labels, original label column
SHARED_FILES = [
    (ifnb, "ifnb_2800.h5ad", (2800, 14053), 13, "cell_type"),
    (pbmc_10x, "10X_PBMC_top2000.h5ad", (4271, 2000), 8, "label"),
    (mouse_bladder, "mouse_bladder_cell_top2000.h5ad", (2746, 2003), 16, "label"),
    (worm_neuron, "worm_neuron_cell.h5ad", (4186, 13488), 10, "label"),
    (human_kidney, "human_kidney_counts_top2000.h5ad", (5685, 2000), 11, "label"),
]


def _assert_counts(adata: ad.AnnData) -> None:
    assert type(adata.X) is sp.csr_matrix
    assert adata.X.dtype == np.float32
    assert adata.X.data.min() >= 0
    np.testing.assert_array_equal(adata.X.data, np.rint(adata.X.data))


@pytest.fixture
def shared_data(monkeypatch) -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} is absent")
    monkeypatch.setenv(DATA_DIR_ENV, str(SHARED_DATA))
    return SHARED_DATA


def _counts_adata(n_cells: int = 30, n_genes: int = 12, seed: int = 0) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    x = sp.csr_matrix(rng.poisson(1.0, size=(n_cells, n_genes)).astype(np.float32))
    obs = pd.DataFrame(
        {"label": pd.Categorical(rng.choice(["type1", "type2", "type3"], size=n_cells))},
        index=[f"cell{i}" for i in range(n_cells)],
    )
    return ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=[f"gene{j}" for j in range(n_genes)]))


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        pass


class _TruncatingHandler(BaseHTTPRequestHandler):
    """Announces 1,000 bytes and sends 10."""

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()
        self.wfile.write(b"x" * 10)
        self.close_connection = True

    def log_message(self, format, *args):
        pass


def _serve(handler) -> tuple[ThreadingHTTPServer, str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture
def served(tmp_path, monkeypatch):
    """A folder served over HTTP on 127.0.0.1; yields (folder, base URL)."""
    for key in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    folder = tmp_path / "served"
    folder.mkdir()
    server, url = _serve(functools.partial(_QuietHandler, directory=str(folder)))
    yield folder, url
    server.shutdown()
    server.server_close()


def _patch_source(monkeypatch, name: str, url: str, source_format: str = "h5ad", sha256: str | None = None) -> None:
    """Point data set ``name`` at ``url`` (a file of ``source_format``); file and cache names stay."""
    source = datasets.DATASETS[name]._replace(url=url, source_format=source_format, sha256=sha256)
    monkeypatch.setitem(datasets.DATASETS, name, source)


# --- data folder -------------------------------------------------------------------------------------------------


def test_data_dir_argument_wins_over_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "env"))
    assert data_dir(tmp_path / "arg") == tmp_path / "arg"
    assert data_dir() == tmp_path / "env"


def test_data_dir_defaults_to_user_cache(monkeypatch):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    assert data_dir() == Path("~/.cache/scmixvae").expanduser()


# --- the shared files ----------------------------------------------------------------------------------------------


@pytest.mark.data
@pytest.mark.parametrize(("loader", "file_name", "shape", "n_labels", "label_key"), SHARED_FILES)
def test_loaders_read_the_shared_files(shared_data, loader, file_name, shape, n_labels, label_key):
    adata = loader()
    assert adata.shape == shape
    _assert_counts(adata)
    assert isinstance(adata.obs["cell_type"].dtype, pd.CategoricalDtype)
    assert adata.obs["cell_type"].nunique() == n_labels
    assert label_key in adata.obs
    np.testing.assert_array_equal(adata.obs["cell_type"].astype(str), adata.obs[label_key].astype(str))


@pytest.mark.data
def test_ifnb_keeps_the_condition(shared_data):
    adata = ifnb()
    assert set(adata.obs["condition"]) == {"CTRL", "STIM"}


@pytest.mark.data
def test_loader_reads_an_explicit_path(shared_data, monkeypatch, tmp_path):
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "empty"))
    adata = pbmc_10x(shared_data / "10X_PBMC_top2000.h5ad")
    assert adata.shape == (4271, 2000)
    assert not (tmp_path / "empty").exists()


@pytest.mark.data
def test_read_counts_by_name_and_path(shared_data):
    by_name = read_counts("mouse_bladder")
    by_path = read_counts(shared_data / "mouse_bladder_cell_top2000.h5ad")
    assert (by_name.X != by_path.X).nnz == 0
    assert by_path.obs["cell_type"].nunique() == 16


def test_missing_explicit_path_raises(tmp_path):
    with pytest.raises(ValueError, match="No file at"):
        worm_neuron(tmp_path / "nope.h5ad")


def test_read_counts_rejects_unknown_names(tmp_path):
    with pytest.raises(ValueError, match="neither a data set name"):
        read_counts(tmp_path / "unknown.h5ad")


def test_readers_refuse_a_file_that_is_not_hdf5(tmp_path):
    """h5py failed with "Unable to synchronously open file (file signature not found)"."""
    (tmp_path / "counts.h5ad").write_text("cell,gene0\nc1,3\n")
    match = r"counts.h5ad is not an .h5ad \(HDF5\) file; convert it first, e.g. for a CSV of counts .*scanpy.read_csv"
    for read in (read_counts, read_scdcc_h5, worm_neuron):
        with pytest.raises(ValueError, match=match):
            read(tmp_path / "counts.h5ad")


def test_read_counts_rejects_normalised_data(tmp_path):
    adata = _counts_adata()
    adata.X = adata.X * 0.5
    adata.write_h5ad(tmp_path / "norm.h5ad")
    with pytest.raises(ValueError, match="does not hold raw counts"):
        read_counts(tmp_path / "norm.h5ad")


def test_read_counts_rejects_infinite_counts(tmp_path):
    adata = _counts_adata()
    adata.X.data[0] = np.inf
    adata.write_h5ad(tmp_path / "inf.h5ad")
    with pytest.raises(ValueError, match="does not hold raw counts"):
        read_counts(tmp_path / "inf.h5ad")


def test_missing_labels_stay_missing_and_the_files_label_order_is_kept(tmp_path):
    """Missing labels were read as a type named "nan", and numbers were ordered as text (1, 10, 2)."""
    adata = _counts_adata()
    labels = ["T", None, "B"] * 10
    adata.obs["cell_type"] = pd.Categorical(labels, categories=["T", "B"])
    adata.obs["label"] = pd.Series([1, 10, 2] * 10, index=adata.obs_names)
    adata.write_h5ad(tmp_path / "missing.h5ad")
    back = read_counts(tmp_path / "missing.h5ad")
    assert back.obs["cell_type"].isna().sum() == 10
    assert list(back.obs["cell_type"].cat.categories) == ["T", "B"]
    del adata.obs["cell_type"]
    adata.write_h5ad(tmp_path / "numbers.h5ad")
    assert list(read_counts(tmp_path / "numbers.h5ad").obs["cell_type"].cat.categories) == ["1", "2", "10"]


def test_read_counts_points_other_hdf5_files_to_their_reader(tmp_path):
    """An scDCC file or an HDF5 file without AnnData's groups failed inside anndata or h5py."""
    _write_scdcc(tmp_path / "scdcc.h5", np.ones((3, 2)), np.array([0, 1, 1]))
    with pytest.raises(ValueError, match=r"scdcc.h5' is an scDCC file, not an .h5ad; read it with read_scdcc_h5"):
        read_counts(tmp_path / "scdcc.h5")
    h5py.File(tmp_path / "empty.h5ad", "w").close()
    with pytest.raises(ValueError, match=r"empty.h5ad' is an HDF5 file but not an .h5ad"):
        read_counts(tmp_path / "empty.h5ad")


def test_read_counts_converts_dense_float64(tmp_path):
    adata = _counts_adata()
    adata.X = adata.X.toarray().astype(np.float64)
    adata.write_h5ad(tmp_path / "dense.h5ad")
    back = read_counts(tmp_path / "dense.h5ad")
    _assert_counts(back)
    assert back.obs["cell_type"].tolist() == adata.obs["label"].tolist()


# --- pbmc68k -------------------------------------------------------------------------------------------------------


def test_pbmc68k_counts_are_integers_that_reproduce_raw():
    import scanpy as sc

    adata = pbmc68k_counts()
    reference = sc.datasets.pbmc68k_reduced()
    assert adata.shape == reference.raw.shape
    _assert_counts(adata)
    assert adata.var_names.equals(reference.raw.var_names)
    assert adata.obs["cell_type"].tolist() == reference.obs["bulk_labels"].tolist()
    assert "bulk_labels" in adata.obs and "n_counts" in adata.obs
    counts = adata.X.toarray().astype(np.float64)
    renormalised = np.log1p(counts / reference.obs["n_counts"].to_numpy()[:, None] * 1e4)
    np.testing.assert_allclose(renormalised, reference.raw.X.toarray(), rtol=0, atol=5e-4 + 1e-6)


def test_pbmc68k_counts_leaves_scanpy_data_alone():
    import scanpy as sc

    before = sc.datasets.pbmc68k_reduced()
    adata = pbmc68k_counts()
    adata.X.data[:] = 0
    after = sc.datasets.pbmc68k_reduced()
    np.testing.assert_array_equal(after.raw.X.toarray(), before.raw.X.toarray())
    assert "cell_type" not in after.obs


# --- downloads (local HTTP server only) ----------------------------------------------------------------------------


def test_download_when_absent_then_cache(served, monkeypatch, tmp_path, capsys):
    folder, url = served
    source = _counts_adata()
    source.write_h5ad(folder / "small.h5ad")
    _patch_source(monkeypatch, "pbmc_10x", f"{url}/small.h5ad")
    cache = tmp_path / "cache"

    adata = pbmc_10x(data_dir=cache)

    assert (adata.X != source.X).nnz == 0
    assert adata.obs["cell_type"].tolist() == source.obs["label"].tolist()
    # written atomically: the final file only, no partial download or temporary folder left behind
    assert sorted(p.name for p in cache.iterdir()) == ["10X_PBMC_top2000.h5ad"]
    assert "pbmc_10x" in capsys.readouterr().err  # the progress bar

    # second call: read from the cache, no download
    _patch_source(monkeypatch, "pbmc_10x", f"{url}/gone.h5ad")
    again = pbmc_10x(data_dir=cache)
    assert (again.X != source.X).nnz == 0


def test_download_uses_environment_data_dir(served, monkeypatch, tmp_path):
    folder, url = served
    _counts_adata().write_h5ad(folder / "small.h5ad")
    _patch_source(monkeypatch, "mouse_bladder", f"{url}/small.h5ad")
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "env"))
    mouse_bladder(progress=False)
    assert (tmp_path / "env" / "mouse_bladder_cell_top2000.h5ad").is_file()


def test_download_progress_can_be_silenced(served, monkeypatch, tmp_path, capsys):
    folder, url = served
    _counts_adata().write_h5ad(folder / "small.h5ad")
    _patch_source(monkeypatch, "pbmc_10x", f"{url}/small.h5ad")
    pbmc_10x(data_dir=tmp_path / "cache", progress=False)
    assert "pbmc_10x" not in capsys.readouterr().err


def test_ifnb_download_converts_pertpy_kang_file(served, monkeypatch, tmp_path):
    folder, url = served
    kang = _counts_adata()
    kang.obs["cell_type"] = pd.Categorical(np.where(np.arange(kang.n_obs) % 2, "B cells", "NK cells"))
    kang.obs["label"] = pd.Categorical(np.where(np.arange(kang.n_obs) % 3, "ctrl", "stim"))
    kang.write_h5ad(folder / "kang.h5ad")
    _patch_source(monkeypatch, "ifnb", f"{url}/kang.h5ad", source_format="kang_h5ad")

    adata = ifnb(data_dir=tmp_path / "cache", progress=False)

    assert adata.obs["condition"].tolist() == [v.upper() for v in kang.obs["label"]]
    assert adata.obs["cell_type"].tolist() == kang.obs["cell_type"].tolist()
    # cached under its own name: it is the full Kang data, not the 2,800-cell subset
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["kang_2018.h5ad"]
    assert ifnb(data_dir=tmp_path / "cache").n_obs == kang.n_obs


def _write_scdcc(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    with h5py.File(path, "w") as f:
        f["X"] = x
        f["Y"] = y


def test_download_converts_scdcc_files(served, monkeypatch, tmp_path):
    folder, url = served
    rng = np.random.default_rng(1)
    x = rng.poisson(2.0, size=(25, 7)).astype(np.float64)
    y = rng.integers(0, 3, size=25)
    _write_scdcc(folder / "kidney.h5", x, y)
    _patch_source(monkeypatch, "human_kidney", f"{url}/kidney.h5", source_format="scdcc_h5")

    adata = human_kidney(data_dir=tmp_path / "cache", progress=False)

    _assert_counts(adata)
    np.testing.assert_array_equal(adata.X.toarray(), x)
    assert adata.obs["label"].tolist() == [f"type{v}" for v in y]
    assert adata.obs["cell_type"].tolist() == [f"type{v}" for v in y]
    assert adata.var_names[:2].tolist() == ["gene0", "gene1"]
    assert adata.obs_names[:2].tolist() == ["cell0", "cell1"]
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["human_kidney_counts_top2000.h5ad"]


def test_read_scdcc_h5_recognises_transposed_files(tmp_path):
    x = np.arange(12, dtype=np.float64).reshape(4, 3)  # 4 genes x 3 cells
    _write_scdcc(tmp_path / "t.h5", x, np.array([1, 2, 2]))
    adata = read_scdcc_h5(tmp_path / "t.h5")
    assert adata.shape == (3, 4)
    np.testing.assert_array_equal(adata.X.toarray(), x.T)


def test_read_scdcc_h5_refuses_labels_that_are_not_integers(tmp_path):
    """1.7 and 2.2 were both read as "type1"/"type2" (truncated), merging labels."""
    for labels in ([0.5, 1.7, 2.2], [0.0, np.nan, 2.0]):
        _write_scdcc(tmp_path / "f.h5", np.ones((3, 2)), np.array(labels))
        with pytest.raises(ValueError, match=r"f.h5' holds missing or non-integer labels"):
            read_scdcc_h5(tmp_path / "f.h5")


def test_read_scdcc_h5_rejects_other_files(tmp_path):
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["counts"] = np.zeros((2, 2))
    with pytest.raises(ValueError, match="needs datasets 'X' and 'Y'"):
        read_scdcc_h5(tmp_path / "other.h5")


def test_download_is_checked_against_its_sha256(served, monkeypatch, tmp_path, caplog):
    import hashlib

    folder, url = served
    _counts_adata().write_h5ad(folder / "small.h5ad")
    digest = hashlib.sha256((folder / "small.h5ad").read_bytes()).hexdigest()
    _patch_source(monkeypatch, "pbmc_10x", f"{url}/small.h5ad", sha256="0" * 64)
    with pytest.raises(ConnectionError, match=f"SHA-256 is {digest}, not the expected 0000"):
        pbmc_10x(data_dir=tmp_path / "bad", progress=False)
    assert not (tmp_path / "bad").exists()  # nothing kept, nothing cached, no folder made

    _patch_source(monkeypatch, "pbmc_10x", f"{url}/small.h5ad", sha256=digest.upper())
    adata = pbmc_10x(data_dir=tmp_path / "good", progress=False)
    assert adata.n_obs == 30 and [p.name for p in (tmp_path / "good").iterdir()] == ["10X_PBMC_top2000.h5ad"]
    _patch_source(monkeypatch, "pbmc_10x", f"{url}/small.h5ad")  # no digest known: the download logs its own
    with caplog.at_level(logging.INFO, logger="scmixvae.data._datasets"):
        pbmc_10x(data_dir=tmp_path / "unknown", progress=False)
    assert f"SHA-256 {digest}" in caplog.text


def test_download_http_404_raises_and_leaves_nothing(served, monkeypatch, tmp_path):
    _, url = served
    _patch_source(monkeypatch, "worm_neuron", f"{url}/missing.h5ad")
    cache = tmp_path / "cache"
    with pytest.raises(ConnectionError, match="HTTP 404"):
        worm_neuron(data_dir=cache, progress=False)
    assert not cache.exists()  # nor the folder the download made (a misspelt $SCMIXVAE_DATA_DIR stayed behind)
    cache.mkdir()
    with pytest.raises(ConnectionError, match="HTTP 404"):
        worm_neuron(data_dir=cache, progress=False)
    assert list(cache.iterdir()) == []  # a folder that was there stays


def test_truncated_download_raises_and_leaves_nothing(monkeypatch, tmp_path):
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    for key in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(key, raising=False)
    server, url = _serve(_TruncatingHandler)
    try:
        _patch_source(monkeypatch, "pbmc_10x", f"{url}/file.h5ad")
        cache = tmp_path / "cache"
        with pytest.raises(ConnectionError, match="got 10 of 1000 bytes"):
            pbmc_10x(data_dir=cache, progress=False)
        assert not cache.exists()
    finally:
        server.shutdown()
        server.server_close()


def test_unreachable_host_raises_connection_error(monkeypatch, tmp_path):
    server, url = _serve(_QuietHandler)
    server.shutdown()
    server.server_close()  # nothing listens on that port any more
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    _patch_source(monkeypatch, "pbmc_10x", f"{url}/file.h5ad")
    with pytest.raises(ConnectionError, match="Downloading"):
        pbmc_10x(data_dir=tmp_path / "cache", progress=False)


def test_download_error_names_the_data_folder(monkeypatch, tmp_path):
    server, url = _serve(_QuietHandler)
    server.shutdown()
    server.server_close()
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    _patch_source(monkeypatch, "pbmc_10x", f"{url}/file.h5ad")
    with pytest.raises(ConnectionError) as info:
        pbmc_10x(data_dir=tmp_path / "cache", progress=False)
    assert f"({tmp_path / 'cache'})" in str(info.value)
    assert ".download-" not in str(info.value)
    assert "The loader reads '10X_PBMC_top2000.h5ad' there." in str(info.value)  # not the .h5 of the URL
    with pytest.raises(ConnectionError):
        pbmc_10x(data_dir=tmp_path / "a" / "b" / "c", progress=False)
    assert not (tmp_path / "a").exists()  # every folder the download made is gone
