"""Files the package reads run no code, unreadable files get clear errors, and writes never lose a file."""

import os
import re
import shlex
import threading
from collections import defaultdict

import anndata
import numpy as np
import pandas as pd
import pytest
import torch

from scmixvae import tl
from scmixvae._io import write_h5ad
from scmixvae.model import CplMixVAE
from scmixvae.model._save_load import decode, encode


class _Payload:
    """Unpickling this object runs a shell command that creates ``marker``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def _poisoned_save(model, folder, marker):
    """Save ``model`` and add to its ``model.pt`` an attribute whose unpickling runs code."""
    model.save(folder, overwrite=True)
    path = folder / "model.pt"
    content = torch.load(path, map_location="cpu", weights_only=False)  # our own, trusted file
    content["attr_dict"]["evil_"] = _Payload(marker)
    torch.save(content, path)
    return path


def test_load_refuses_a_model_file_that_would_run_code(trained_model, tmp_path):
    marker = tmp_path / "payload_ran"
    path = _poisoned_save(trained_model, tmp_path / "model", marker)
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*holds Python objects other than tensors"):
        CplMixVAE.load(tmp_path / "model", adata=trained_model.adata)
    with pytest.raises(ValueError, match="not a saved scmixvae model"):
        CplMixVAE.load_registry(tmp_path / "model")
    with pytest.raises(ValueError, match="not a saved scmixvae model"):
        CplMixVAE.view_setup_args(tmp_path / "model")
    assert not marker.exists()


def test_saved_model_file_holds_only_tensors_and_plain_data(trained_model, tmp_path):
    trained_model.save(tmp_path / "model")
    content = torch.load(tmp_path / "model" / "model.pt", weights_only=True)  # raises on any other object
    assert content["var_names"] == list(trained_model.adata.var_names)
    registry = CplMixVAE.load_registry(tmp_path / "model")
    assert registry["model_name"] == "CplMixVAE"
    np.testing.assert_array_equal(
        registry["field_registries"]["X"]["state_registry"]["column_names"], trained_model.adata.var_names
    )


def _flip_a_weight_bit(data: bytes) -> bytes:
    """Flip a high mantissa bit of one float of the module's weights (a value changed, the size kept)."""
    import io
    import zipfile

    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        info = next(i for i in archive.infolist() if "/data/" in i.filename and i.file_size >= 64)
    header = info.header_offset  # local header: 30 bytes, then the name and an extra field of its own lengths
    names = int.from_bytes(data[header + 26 : header + 28], "little") + int.from_bytes(
        data[header + 28 : header + 30], "little"
    )
    start = header + 30 + names
    flipped = bytearray(data)
    flipped[start + 2] ^= 0x40  # byte 2 of the first float32 (little-endian): mantissa
    return bytes(flipped)


@pytest.mark.parametrize(
    "content",
    [b"", b"hello, I am a text file\n", "truncated", "bit flipped"],
    ids=["empty", "text", "truncated", "bit flipped"],
)
def test_load_names_a_file_that_is_not_a_saved_model(trained_model, tmp_path, content):
    # a flipped bit in a weight loaded as another weight: torch.load does not check the archive's checksums
    folder = tmp_path / "model"
    trained_model.save(folder)
    path = folder / "model.pt"
    if content == "truncated":
        content = path.read_bytes()[: path.stat().st_size // 2]
    elif content == "bit flipped":
        content = _flip_a_weight_bit(path.read_bytes())
    path.write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(str(path)) + " is not a saved scmixvae model"):
        CplMixVAE.load(folder, adata=trained_model.adata)


def test_load_without_a_model_file_or_saved_data_says_what_is_missing(trained_model, tmp_path):
    with pytest.raises(ValueError, match="is not a saved scmixvae model: the file does not exist"):
        CplMixVAE.load(tmp_path / "nothing", adata=trained_model.adata)
    trained_model.save(tmp_path / "model")
    with pytest.raises(ValueError, match=r"holds no saved AnnData.*adata="):
        CplMixVAE.load(tmp_path / "model")


def test_load_onto_other_genes_or_another_order_is_an_error(trained_model, tmp_path):
    trained_model.save(tmp_path / "model")
    adata = trained_model.adata
    with pytest.raises(ValueError, match=r"the model's genes in another order.*adata\[:, genes\]"):
        CplMixVAE.load(tmp_path / "model", adata=adata[:, adata.var_names[::-1]].copy())
    renamed = adata.copy()
    renamed.var_names = [f"other_{i}" for i in range(adata.n_vars)]
    with pytest.raises(ValueError, match=f"{adata.n_vars} missing"):
        CplMixVAE.load(tmp_path / "model", adata=renamed)
    with pytest.raises(ValueError, match="missing"):
        CplMixVAE.load(tmp_path / "model", adata=adata[:, 1:].copy())


def test_saved_attributes_round_trip_through_plain_data(tmp_path):
    frame = pd.DataFrame(
        {
            "round": np.arange(3),
            "loss": [0.5, np.nan, 1.5],
            "categories": ['["0", "1"]', "[]", None],
            "selected": [True, False, False],
            "kind": pd.Categorical(["a", "b", "a"], categories=["b", "a"]),
        }
    )
    frame.attrs = {"selected_round": 1, "ari": [1.0, 0.5]}
    history = pd.DataFrame({"train_loss": pd.Series([1.0, 2.0], dtype=object)}, index=pd.Index([3, 4], name="epoch"))
    value = {
        "history_": {"train_loss": history},
        "pruning_history_": frame,
        "neighbours_": np.arange(12, dtype=np.int64).reshape(4, 3),
        "column_names": np.array(["g1", "g2"], dtype=object),
        "mapping": np.array(["b0", "b1"]),
        "scalar": np.float32(0.25),
        "registry": defaultdict(dict, {"X": {"n_vars": 2}}),
        "ints": {0: "a", 1: "b"},
        "shape": (2, 3),
        "none": None,
        "tensor": torch.ones(2),
    }
    torch.save(encode(value), tmp_path / "f.pt")
    back = decode(torch.load(tmp_path / "f.pt", weights_only=True))
    pd.testing.assert_frame_equal(back["pruning_history_"], frame)
    assert back["pruning_history_"].attrs == frame.attrs
    pd.testing.assert_frame_equal(back["history_"]["train_loss"], history)
    np.testing.assert_array_equal(back["neighbours_"], value["neighbours_"])
    assert back["neighbours_"].dtype == np.int64
    assert back["column_names"].dtype == object and list(back["column_names"]) == ["g1", "g2"]
    assert back["mapping"].dtype == value["mapping"].dtype
    assert back["scalar"] == 0.25
    assert isinstance(back["registry"], defaultdict) and back["registry"]["X"] == {"n_vars": 2}
    assert back["ints"] == {0: "a", 1: "b"} and back["shape"] == (2, 3) and back["none"] is None
    torch.testing.assert_close(back["tensor"], torch.ones(2))


def test_a_failed_save_leaves_the_earlier_save_intact(sim_adata, tmp_path):
    CplMixVAE.setup_anndata(sim_adata)
    model = CplMixVAE(sim_adata, n_categories=3)
    model.save(tmp_path / "model")
    before = (tmp_path / "model" / "model.pt").read_bytes()
    model.lock_ = threading.Lock()  # not data: cannot be saved
    with pytest.raises(TypeError, match="lock_"):
        model.save(tmp_path / "model", overwrite=True)
    assert (tmp_path / "model" / "model.pt").read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["model.pt"]  # no temporary file left
    with pytest.raises(ValueError, match="already exists; pass overwrite=True"):
        model.save(tmp_path / "model")


def test_overwriting_a_model_without_its_anndata_keeps_the_anndata_but_does_not_pair_it(sim_adata, tmp_path):
    # load() paired the new model with the cells the old one had been saved with, without a word; then the cells
    # were deleted, which lost a user's data where they were its only copy
    CplMixVAE.setup_anndata(sim_adata)
    CplMixVAE(sim_adata, n_categories=3).save(tmp_path / "model", save_anndata=True)
    CplMixVAE(sim_adata, n_categories=3).save(tmp_path / "model", prefix="other_", overwrite=True, save_anndata=True)
    CplMixVAE(sim_adata, n_categories=4).save(tmp_path / "model", overwrite=True)
    files = ["adata.h5ad", "model.pt", "other_adata.h5ad", "other_model.pt"]
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == files
    with pytest.raises(ValueError, match=r"holds no saved AnnData of this model \(adata.h5ad\); pass the data with"):
        CplMixVAE.load(tmp_path / "model")


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda attrs, state: state.pop("px_r"), r"The weights in .*model.pt do not fit .*Missing key\(s\).*px_r"),
        (lambda attrs, state: state.__setitem__("px_r", torch.zeros(3)), r"do not fit .*size mismatch for px_r"),
        (lambda attrs, state: attrs.__setitem__("module", 5), r"is not a saved scmixvae model: it sets .*'module'"),
    ],
    ids=["missing weight", "misshapen weight", "attribute module"],
)
def test_load_of_weights_or_attributes_that_do_not_fit_is_a_clear_error(trained_model, tmp_path, edit, match):
    # torch's RuntimeError from load_state_dict, or "'int' object has no attribute 'load_state_dict'"
    from scmixvae.model._save_load import model_file_content, read_model_file

    trained_model.save(tmp_path / "model")
    attrs, genes, state, _ = read_model_file(tmp_path / "model" / "model.pt")
    state = dict(state)
    edit(attrs, state)
    torch.save(model_file_content(state, genes, attrs, None), tmp_path / "model" / "model.pt")
    with pytest.raises(ValueError, match=match):
        CplMixVAE.load(tmp_path / "model", adata=trained_model.adata.copy())


@pytest.mark.parametrize("save_anndata", [True, False])
def test_a_save_that_fails_half_way_cannot_pair_two_saves(sim_adata, tmp_path, monkeypatch, save_anndata):
    # a full disk while model.pt was written left the new cells beside the old model (and, without the AnnData, the
    # old cells stay beside the new model); load() paired them without a word
    CplMixVAE.setup_anndata(sim_adata)
    CplMixVAE(sim_adata, n_categories=3).save(tmp_path / "model", save_anndata=True)
    other = sim_adata[:200].copy()
    CplMixVAE.setup_anndata(other)
    if save_anndata:
        monkeypatch.setattr(torch, "save", lambda *args, **kwargs: (_ for _ in ()).throw(OSError(28, "No space")))
        with pytest.raises(OSError):
            CplMixVAE(other, n_categories=3).save(tmp_path / "model", overwrite=True, save_anndata=True)
        monkeypatch.undo()
    else:  # the earlier save's cells stay (they were removed, and so lost when they were the only copy)
        saved = (tmp_path / "model" / "adata.h5ad").read_bytes()
        CplMixVAE(other, n_categories=3).save(tmp_path / "model", overwrite=True, save_anndata=False)
        assert (tmp_path / "model" / "adata.h5ad").read_bytes() == saved
    match = "holds other cells than those saved with model.pt" if save_anndata else "holds no saved AnnData of this"
    with pytest.raises(ValueError, match=match):
        CplMixVAE.load(tmp_path / "model")
    assert CplMixVAE.load(tmp_path / "model", adata=sim_adata if save_anndata else other).adata.n_obs > 0


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"prefix": "run/1_"}, ValueError, r"`prefix` must be a file-name prefix without a folder, got 'run/1_'"),
        ({"save_kwargs": {"compression": 9}}, TypeError, r"save_kwargs \['compression'\] not taken by torch.save"),
        ({"save_kwargs": [("pickle_protocol", 4)]}, TypeError, "`save_kwargs` must be a dict"),
        ({"compresion": "gzip"}, TypeError, r"keyword argument \['compresion'\] not taken by AnnData.write_h5ad"),
    ],
)
def test_save_arguments_that_would_fail_half_way_are_refused_before_any_file(sim_adata, tmp_path, kwargs, error, match):
    """torch.save's and write_h5ad's own errors came after adata.h5ad was written: an earlier save was left with
    the new AnnData beside the old model.pt; a prefix with a folder failed after the folder was made."""
    CplMixVAE.setup_anndata(sim_adata)
    model = CplMixVAE(sim_adata, n_categories=3)
    model.save(tmp_path / "model", save_anndata=True)
    before = {p.name: p.read_bytes() for p in (tmp_path / "model").iterdir()}
    sim_adata.obs["new"] = 1  # an AnnData that differs from the saved one
    with pytest.raises(error, match=match):
        model.save(tmp_path / "model", overwrite=True, save_anndata=True, **kwargs)
    assert {p.name: p.read_bytes() for p in (tmp_path / "model").iterdir()} == before
    with pytest.raises(error, match=match):
        model.save(tmp_path / "new", save_anndata=True, **kwargs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    model.save(tmp_path / "new", prefix="run1_", save_kwargs={"pickle_protocol": 4}, compression="gzip")
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["run1_model.pt"]


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_written_files_get_the_usual_permissions_not_a_temporary_files(tmp_path):
    adata = anndata.AnnData(np.ones((3, 2), dtype=np.float32))
    old_umask = os.umask(0o027)
    try:
        write_h5ad(adata, tmp_path / "new.h5ad")
        (tmp_path / "shared.h5ad").write_bytes(b"")
        (tmp_path / "shared.h5ad").chmod(0o664)
        write_h5ad(adata, tmp_path / "shared.h5ad")
    finally:
        os.umask(old_umask)
    assert (tmp_path / "new.h5ad").stat().st_mode & 0o777 == 0o640  # 0o666 less the umask
    assert (tmp_path / "shared.h5ad").stat().st_mode & 0o777 == 0o664  # the replaced file's
    assert anndata.read_h5ad(tmp_path / "shared.h5ad").shape == (3, 2)


def test_write_h5ad_keeps_the_old_file_when_the_new_one_cannot_be_written(tmp_path):
    path = tmp_path / "out.h5ad"
    anndata.AnnData(np.ones((3, 2), dtype=np.float32)).write_h5ad(path)
    before = path.read_bytes()
    bad = anndata.AnnData(np.zeros((3, 2), dtype=np.float32))
    bad.uns["not_storable"] = object()
    with pytest.raises(Exception, match="No method registered for writing"):
        write_h5ad(bad, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.h5ad"]


@pytest.mark.parametrize(
    ("key", "error", "message"),
    [("run/1", ValueError, "cannot be stored in an .h5ad"), (".", ValueError, "cannot be stored"),
     ("", TypeError, "non-empty string"), (3, TypeError, "non-empty string")],
)  # fmt: skip
def test_tl_verbs_refuse_keys_that_do_not_survive_h5ad(trained_model, key, error, message):
    adata = trained_model.adata.copy()
    columns, uns = list(adata.obs.columns), set(adata.uns)
    with pytest.raises(error, match=message):
        tl.annotate(adata, trained_model, key_added=key)
    with pytest.raises(error, match=message):
        tl.rank_state_genes(adata, trained_model, key_added=key)
    assert list(adata.obs.columns) == columns and set(adata.uns) == uns


def _save_as_before(model, folder, non_kwargs=None, module_kwargs=None):
    """Save ``model`` as a version that still had the removed options would: with them in its init parameters."""
    model.save(folder, overwrite=True, save_anndata=False)
    path = folder / "model.pt"
    content = torch.load(path, map_location="cpu", weights_only=True)
    init_params = content["attr_dict"]["init_params_"]
    init_params["non_kwargs"].update(non_kwargs or {})
    init_params["kwargs"]["module_kwargs"] = {**init_params["kwargs"].get("module_kwargs", {}), **(module_kwargs or {})}
    torch.save(content, path)


OLD_DEFAULTS = {
    "category_init": "leiden",
    "n_hidden_state": 32,
    "initial_coupling_weight": None,
    "state_encoder": "separate",
    "augmentation_strength": None,
    "condition_weight": 1.0,
}
OLD_MODULE_DEFAULTS = {
    "gumbel_temperature": 1.0,
    "coupling_eps": 1e-8,
    "entropy_weight": 1.0,
    "coupling": "clr",
    "category_state_interaction": True,
}


def test_a_model_saved_with_removed_options_at_their_fixed_values_loads(trained_model, tmp_path):
    _save_as_before(trained_model, tmp_path / "old", OLD_DEFAULTS, OLD_MODULE_DEFAULTS)
    loaded = CplMixVAE.load(tmp_path / "old", adata=trained_model.adata)
    pd.testing.assert_frame_equal(loaded.predict(soft=True), trained_model.predict(soft=True))
    assert not {*OLD_DEFAULTS, *OLD_MODULE_DEFAULTS} & set(loaded.init_params_["non_kwargs"])
    assert not set(OLD_MODULE_DEFAULTS) & set(loaded.init_params_["kwargs"]["module_kwargs"])
    # a trained model's category_init and initial_coupling_weight shaped only its training: any value loads
    _save_as_before(trained_model, tmp_path / "random", {"category_init": "random", "initial_coupling_weight": 0.01})
    assert CplMixVAE.load(tmp_path / "random", adata=trained_model.adata).is_trained_


@pytest.mark.parametrize(
    ("non_kwargs", "module_kwargs", "match"),
    [
        ({"n_hidden_state": 64}, None, r"saved with n_hidden_state=64, an option .* no longer has .*=32"),
        ({"state_encoder": "staged"}, None, r"saved with state_encoder='staged'.*only state_encoder='separate'"),
        ({"state_encoder": "shared"}, None, r"saved with state_encoder='shared', an option .*='separate'"),
        ({"augmentation_strength": 0.5}, None, r"saved with augmentation_strength=0\.5, an option"),
        ({"condition_weight": 0.0}, None, r"saved with condition_weight=0\.0, an option .*=1\.0"),
        (None, {"coupling": "aitchison"}, r"saved with coupling='aitchison', an option .*only coupling='clr'"),
        (None, {"category_state_interaction": False}, r"saved with category_state_interaction=False, an option"),
        (None, {"entropy_weight": 0.0}, r"saved with entropy_weight=0\.0, an option"),
        (None, {"gumbel_temperature": 0.5}, r"saved with gumbel_temperature=0\.5, an option"),
    ],
)
def test_a_model_saved_with_a_removed_option_changed_names_it(
    trained_model, tmp_path, non_kwargs, module_kwargs, match
):
    _save_as_before(trained_model, tmp_path / "old", non_kwargs, module_kwargs)
    with pytest.raises(ValueError, match=match):
        CplMixVAE.load(tmp_path / "old", adata=trained_model.adata)


def test_an_untrained_model_saved_with_a_random_start_names_category_init(sim_adata, tmp_path):
    CplMixVAE.setup_anndata(sim_adata)
    model = CplMixVAE(sim_adata, n_categories=3, n_hidden=16)
    _save_as_before(model, tmp_path / "old", {"category_init": "random"})
    with pytest.raises(ValueError, match=r"saved with category_init='random'.*only category_init='leiden' is kept"):
        CplMixVAE.load(tmp_path / "old", adata=sim_adata)


def test_load_and_query_refuse_an_accelerator_lightning_cannot_use_before_reading_files(
    tmp_path, sim_adata, monkeypatch
):
    """Lightning refused them only after the model's files were read (and with its own exception types)."""
    from scmixvae.model import _model, _query

    monkeypatch.setattr(_model, "load_model", lambda *a, **k: pytest.fail("the model's files were read"))
    monkeypatch.setattr(_query, "_read_reference", lambda *a, **k: pytest.fail("the reference was read"))
    with pytest.raises(ValueError, match="accelerator='nope' with devices='auto' cannot be used on this machine"):
        CplMixVAE.load(tmp_path, adata=sim_adata, accelerator="nope")
    with pytest.raises(ValueError, match="accelerator='cpu' with devices=0 cannot be used on this machine"):
        CplMixVAE.load_query_data(sim_adata, tmp_path, accelerator="cpu", device=0)
