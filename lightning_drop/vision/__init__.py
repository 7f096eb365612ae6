"""Vision transformers (ViT, DINOv2 (+registers), DINOv3 ViT, SwinV2): block / attention / MLP drop.

Importing this package registers the dropped vision classes with transformers' Auto classes, so
`AutoModelForImageClassification.from_pretrained(dir)` (or `AutoModel` for DINOv3) loads dropped checkpoints.
"""

from .architectures import VISION_SPECS, VisionSpec, get_vision_spec, supported_vision_model_types
from .checkpoint import load_vision_dropped, save_vision_dropped
from .modeling_dropped import apply_drop, dropped_layers, register_vision_auto_classes

register_vision_auto_classes()

__all__ = [
    "VISION_SPECS", "VisionSpec", "apply_drop", "dropped_layers", "get_vision_spec", "load_vision_dropped",
    "register_vision_auto_classes", "save_vision_dropped", "supported_vision_model_types",
]
