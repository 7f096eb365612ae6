"""Lightning callbacks for dropping: name them in configs as `lightning_drop.callbacks.<Name>`.

Tracking, dropping and recovery live here; evaluation (`LMEvalCallback`, `PerplexityCallback`), speed
(`SpeedBenchmark`) and quantization (`QuantizeCallback`) come from sibling modules that are imported
guardedly, so a missing optional module never breaks the others.
"""

from __future__ import annotations

import importlib
import warnings

from .importance_tracker import ImportanceTracker
from .layer_drop import LayerDrop
from .lora_recovery import LoRARecovery

__all__ = ["ImportanceTracker", "LayerDrop", "LoRARecovery"]

_OPTIONAL = {
    "evaluation": ("LMEvalCallback", "PerplexityCallback"),
    "speed": ("SpeedBenchmark",),
    "quantize": ("QuantizeCallback",),
}
for _module, _names in _OPTIONAL.items():
    try:
        _mod = importlib.import_module(f"{__name__}.{_module}")
    except ImportError as _err:  # the module is not there (yet) or an optional dependency is missing
        if _err.name != f"{__name__}.{_module}":
            warnings.warn(f"lightning_drop.callbacks.{_module} not available: {_err}", stacklevel=2)
        continue
    for _name in _names:
        if hasattr(_mod, _name):
            globals()[_name] = getattr(_mod, _name)
            __all__.append(_name)
del _module, _names
