"""Vision transformers (ViT, DINOv2 (+registers), DINOv3 ViT, SwinV2): block / attention / MLP drop.

The core (`lightning_drop.architectures`, `modeling_dropped`, `checkpoint`, `importance`) handles vision
families like decoders; this package adds image data, the image-classification LightningModule and its
callbacks, and keeps the vision names below. Once `lightning_drop` is imported, the dropped classes of every
family are registered with transformers' Auto classes (when transformers is imported), so
`AutoModelForImageClassification.from_pretrained(dir)` (or `AutoModel` for DINOv3) loads dropped
checkpoints. The names below are imported on first use.
"""

from .. import _lazy_exports

_EXPORTS = {
    "VISION_SPECS": "architectures", "VisionSpec": "architectures", "get_vision_spec": "architectures",
    "supported_vision_model_types": "architectures",
    "load_vision_dropped": "checkpoint", "save_vision_dropped": "checkpoint",
    "apply_drop": "modeling_dropped", "dropped_layers": "modeling_dropped",
    "register_vision_auto_classes": "modeling_dropped",
}
__getattr__, __dir__ = _lazy_exports(__name__, _EXPORTS)

__all__ = [
    "VISION_SPECS", "VisionSpec", "apply_drop", "dropped_layers", "get_vision_spec", "load_vision_dropped",
    "register_vision_auto_classes", "save_vision_dropped", "supported_vision_model_types",
]
