"""The model stage: the Hyperloop architecture, its checkpoint folders, data, trainer and reference eval."""
from edgeloop.model.checkpoint import CheckpointError, load_model, load_tokenizer, save_checkpoint
from edgeloop.model.config import PRESETS, ConfigError, HyperloopConfig
from edgeloop.model.model import Hyperloop, KVCache

__all__ = ["PRESETS", "CheckpointError", "ConfigError", "Hyperloop", "HyperloopConfig", "KVCache",
           "load_model", "load_tokenizer", "save_checkpoint"]
