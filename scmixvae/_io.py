"""Writing files without ever leaving a half-written or lost file behind."""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> None:
    """Call ``write(temporary_path)`` in ``path``'s folder, then move the file into place.

    The temporary file keeps ``path``'s suffix (writers such as matplotlib choose the format by it). A write
    that fails or is interrupted leaves ``path`` as it was and removes the temporary file. The file gets the
    permissions of the file it replaces, or those of a newly created file (the umask's), not the owner-only ones
    of a temporary file.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, _permissions(path))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _permissions(path: Path) -> int:
    """Permission bits for a file written to ``path``: those of the file there, else ``0o666`` less the umask."""
    if path.is_file():
        return stat.S_IMODE(path.stat().st_mode)
    umask = os.umask(0o022)  # reading the umask means setting it; put it back at once
    os.umask(umask)
    return 0o666 & ~umask


def write_h5ad(adata, path: str | os.PathLike) -> None:
    """Write ``adata`` to ``path`` through a temporary file that is read back before it replaces ``path``."""
    import anndata

    def write_and_check(tmp: str) -> None:
        adata.write_h5ad(tmp)
        anndata.read_h5ad(tmp)  # a file that cannot be read back never replaces the old one

    atomic_write(path, write_and_check)


def unwritable_reason(path: Path) -> str | None:
    """Why a file cannot be created at ``path``; ``None`` if it can.

    Tried, not guessed from permission bits (which say nothing of, e.g., root on a read-only or virtual file
    system): the first missing folder on the way is created and removed again, or, when the folder exists, a
    temporary file in it. Nothing is left behind.
    """
    folder, missing = path.parent, None
    while not folder.exists():
        folder, missing = folder.parent, folder
    if not folder.is_dir():
        return f"{folder} is a file, not a folder"
    if path.is_dir():
        return f"{path} is a folder"
    try:
        if missing is not None:
            missing.mkdir()
            missing.rmdir()
        else:
            fd, probe = tempfile.mkstemp(dir=folder, prefix=".scmixvae-write-check.")
            os.close(fd)
            os.unlink(probe)
    except OSError as err:
        return f"no file can be created in {folder} ({err.strerror or err})"
    return None


def not_hdf5_reason(path: Path) -> str | None:
    """Why ``path`` cannot hold counts to read: it is not HDF5 (as ``.h5ad`` and ``.h5`` files are); else ``None``."""
    import h5py

    if h5py.is_hdf5(path):
        return None
    return (
        f"{os.fspath(path)} is not an .h5ad (HDF5) file; convert it first, e.g. for a CSV of counts with cells in "
        "rows: `scanpy.read_csv(path).write_h5ad('counts.h5ad')`"
    )
