"""Importers: checkpoints of other looped-LM codebases -> edgeloop checkpoint folders.

    import_folder(src, out, fmt=None, **options)   detect the format (or take `fmt`) and convert
    detect(folder) -> Importer | None              which registered format a folder is in
    temporary_checkpoint(path, out)                 a foreign folder wherever an edgeloop one is expected

Each format is one module of this package that registers an Importer (edgeloop.importers.common: the
protocol and the shared plumbing); every module here is imported, so a new format is one new file.
"""
import importlib
import pkgutil

from edgeloop.importers.common import (IMPORTERS, Importer, ImporterError, Source, as_checkpoint, detect,
                                       import_folder, temporary_checkpoint)

for _m in pkgutil.iter_modules(__path__):
    if _m.name != "common":
        importlib.import_module(f"{__name__}.{_m.name}")

from edgeloop.importers.nanochat import NanochatImportError, import_nanochat, is_nanochat  # noqa: E402

__all__ = ["IMPORTERS", "Importer", "ImporterError", "NanochatImportError", "Source", "as_checkpoint", "detect",
           "import_folder", "import_nanochat", "is_nanochat", "temporary_checkpoint"]
