"""The runtime stage: run an edgeloop export with onnxruntime (numpy + onnxruntime + tokenizers only,
no torch), and measure it.

    from edgeloop.runtime import Runtime
    rt = Runtime("exports/tiny-int4", ep="cpu")
    print(rt.generate("And God said", max_new_tokens=40).text[0])
"""
from edgeloop.runtime.runtime import Generation, Runtime
from edgeloop.runtime.sampling import encode, windows
from edgeloop.runtime.session import (
    PROVIDERS, ContextLengthError, ConventionError, NotAnExportError, ProviderUnavailableError, RuntimeInputError)

__all__ = ["PROVIDERS", "ContextLengthError", "ConventionError", "Generation", "NotAnExportError",
           "ProviderUnavailableError", "Runtime", "RuntimeInputError", "encode", "windows"]
