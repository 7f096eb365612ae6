"""Vision-transformer families: the vision view of the core `lightning_drop.architectures`.

`VisionSpec` is the core `ArchSpec` (one dataclass for decoders and encoders); the families themselves are
data in `lightning_drop/vision_families.py`. This module only narrows look-ups to vision families, so a
decoder name gets a vision-specific error.
"""

from __future__ import annotations

from typing import Any

from ..architectures import DROPPED_PREFIX, VISION_SPECS, ArchSpec, get_spec, supported_model_types
from ..errors import UserError

VisionSpec = ArchSpec

__all__ = ["DROPPED_PREFIX", "VISION_SPECS", "VisionSpec", "get_vision_spec", "supported_vision_model_types",
           "vision_spec_for_model_type"]


def supported_vision_model_types() -> list[str]:
    return supported_model_types("image")


def vision_spec_for_model_type(model_type: str) -> ArchSpec:
    return get_vision_spec(model_type)


def get_vision_spec(model_or_config: Any) -> ArchSpec:
    """The spec of a vision model, its config, a config dict, or a model_type string."""
    try:
        spec = get_spec(model_or_config)
    except UserError:
        spec = None
    if spec is None or spec.inputs != "image":
        name = model_or_config if isinstance(model_or_config, str) else type(model_or_config).__name__
        raise UserError(f"unsupported vision architecture '{name}'; supported model types: "
                        f"{', '.join(supported_vision_model_types())}")
    return spec
