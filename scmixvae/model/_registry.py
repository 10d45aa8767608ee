"""scvi-tools' registry views that fail in scvi-tools 1.4, made to work on CplMixVAE."""

from __future__ import annotations

import rich
import rich.pretty


class CplMixVAERegistryMixin:
    """``view_registry``, ``view_setup_method_args`` and ``update_setup_method_args`` that work.

    In scvi-tools 1.4 the model's ``view_registry`` passes an argument its ``view_setup_method_args`` does not
    take and ``update_setup_method_args`` reads an attribute the model does not have; here they read the model's
    registry (``registry_``), as documented.
    """

    def view_setup_method_args(self) -> None:
        """Print the arguments of :meth:`setup_anndata` the model's data was registered with."""
        rich.print(f"Setup via `{self.registry_['model_name']}.setup_anndata` with arguments:")
        rich.pretty.pprint(self.registry_["setup_args"])
        rich.print()

    def view_registry(self, hide_state_registries: bool = False) -> None:
        """Print the registry of the model's AnnData (the fields and, unless hidden, their state registries)."""
        self.adata_manager.view_registry(hide_state_registries=hide_state_registries)

    def update_setup_method_args(self, setup_method_args: dict) -> None:
        """Update the recorded arguments of :meth:`setup_anndata` (``registry["setup_args"]``) with a dict."""
        if not isinstance(setup_method_args, dict):
            raise TypeError(f"`setup_method_args` must be a dict, got {type(setup_method_args).__name__}.")
        self.registry_["setup_args"].update(setup_method_args)

    @classmethod
    def convert_legacy_save(cls, *args, **kwargs) -> None:
        """Not available: CplMixVAE was never saved in scvi-tools' legacy format (before 0.15).

        Raises :class:`NotImplementedError`; load saved models with :meth:`load`.
        """
        raise NotImplementedError(
            "CplMixVAE has no legacy save format to convert (scvi-tools < 0.15 predates it), and unpickling such "
            "files could run code; load a saved model with CplMixVAE.load(dir_path, adata=adata)."
        )
