"""Importers: checkpoints of other looped-LM codebases -> edgeloop checkpoint folders (one architecture)."""
from edgeloop.importers.nanochat import (NanochatImportError, as_checkpoint, import_nanochat, is_nanochat,
                                       temporary_checkpoint)

__all__ = ["NanochatImportError", "as_checkpoint", "import_nanochat", "is_nanochat", "temporary_checkpoint"]
