"""Lightning callbacks for dropping: name them in configs as `lightning_drop.callbacks.<Name>`.

Tracking, dropping and recovery live here; evaluation (`LMEvalCallback`, `PerplexityCallback`), speed
(`SpeedBenchmark`) and quantization (`QuantizeCallback`) come from sibling modules that are imported
guardedly, so a missing optional module never breaks the others.

How they cooperate (`fit_end.FitEnd`, one record per fit on the trainer): in `setup("fit")` each callback
joins with a role. `LayerDrop` is a `drop` (a fit-end drop registers its drop as a finishing step),
`LoRARecovery` and `Distillation` are `adapters` (a merge is a finishing step; they start once the drops that
joined before them are finished; a drop calls `FitEnd.before_drop` first, so `Distillation` copies its teacher
from the model as it was; what they train is one `trainable.TrainableSet`), and `LMEvalCallback`,
`PerplexityCallback`, `SpeedBenchmark` and `QuantizeCallback` are `measure`s that provide the results
`lm_eval`, `perplexity`, `speed` and `quantize`. At fit end a measurement takes `FitEnd.final_model` (every
finishing step run, in joining order, each once) and may ask for another's result (`FitEnd.result`: measured
then if its callback comes later), so measurements may be listed anywhere. Only the order of drops and
adapters matters, because it is the pipeline the user wrote (drops first, then the adapters that recover from
them; a drop listed after adapters that act before it is refused). Everything works on any LightningModule
holding a Hugging Face model (`_common.hf_of`) and under DDP: the calls are made on every rank, drops
broadcast their selection and results are broadcast from rank zero, so all ranks agree.
"""

from __future__ import annotations

import importlib
import warnings

from .distillation import Distillation
from .importance_tracker import ImportanceTracker
from .layer_drop import LayerDrop
from .lora_recovery import LoRARecovery

__all__ = ["Distillation", "ImportanceTracker", "LayerDrop", "LoRARecovery"]

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
