"""lightning-drop: find and remove redundant blocks, attention and MLP sublayers of transformers."""

from .architectures import ArchSpec, get_spec, supported_model_types
from .checkpoint import load_dropped, save_dropped
from .modeling_dropped import apply_drop, dropped_layers, register_auto_classes
from .models import load_model, load_tokenizer

register_auto_classes()

from . import vision  # noqa: E402  (registers the dropped vision classes too)

__version__ = "0.1.0"
__all__ = [
    "ArchSpec", "apply_drop", "dropped_layers", "get_spec", "load_dropped", "load_model", "load_tokenizer",
    "save_dropped", "supported_model_types", "__version__",
]
