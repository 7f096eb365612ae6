"""lightning-drop: find and remove redundant blocks, attention and MLP sublayers of transformers.

The public names are imported on first use (PEP 562), so `import lightning_drop` and the `lightning-drop`
command's `--help` load neither torch nor transformers. What the eager imports used to guarantee still
holds: once `lightning_drop` is imported, the dropped classes of every family are registered with
transformers' Auto classes as soon as transformers itself is imported (before or after this package), so
`AutoModelForCausalLM.from_pretrained(dropped_dir)` works without `trust_remote_code`.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "ArchSpec": "core.architectures", "get_spec": "core.architectures", "supported_model_types": "core.architectures",
    "load_dropped": "io.dropped_checkpoint", "save_dropped": "io.dropped_checkpoint",
    "apply_drop": "core.modeling_dropped", "dropped_layers": "core.modeling_dropped",
    "register_auto_classes": "core.modeling_dropped",
    "load_model": "io.model_loading", "load_tokenizer": "io.model_loading",
}
__all__ = [
    "ArchSpec", "apply_drop", "dropped_layers", "get_spec", "load_dropped", "load_model", "load_tokenizer",
    "save_dropped", "supported_model_types", "__version__",
]


def _lazy_exports(package: str, exports: dict[str, str]) -> tuple[Any, Any]:
    """PEP 562 `__getattr__` and `__dir__` for `package`: `name` is imported from submodule `exports[name]`
    on first use, and any submodule is reachable as an attribute, as eager imports made it."""
    namespace = sys.modules[package].__dict__

    def __getattr__(name: str) -> Any:
        if name in exports:
            value = getattr(importlib.import_module(f".{exports[name]}", package), name)
            namespace[name] = value  # later lookups skip this function
            return value
        if not name.startswith("_") and importlib.util.find_spec(f"{package}.{name}") is not None:
            return importlib.import_module(f".{name}", package)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted({*namespace, *exports})

    return __getattr__, __dir__


__getattr__, __dir__ = _lazy_exports(__name__, _EXPORTS)


# ------------------------------------------------------------------ Auto-class registration, import-order free
# module -> its registration function; each registers itself the moment its own import completes
_REGISTRARS = {
    f"{__name__}.core.modeling_dropped": "register_auto_classes",  # every family, decoders and vision alike
}


def _after_transformers() -> None:
    """transformers has just been imported: import the dropped-class modules (which then register).

    A module already in `sys.modules` here is mid-import (its own `import transformers` got us here); it
    registers when it completes, so it is left alone rather than read half-built.
    """
    for module in _REGISTRARS:
        if module not in sys.modules:
            importlib.import_module(module)


class _RegistrationHook(importlib.abc.MetaPathFinder):
    """Runs code right after `transformers` or a dropped-class module finishes importing.

    Eager registration would cost every `import lightning_drop` the import of transformers and of each
    family's modeling code (seconds); this hook defers that cost to the process that imports transformers
    anyway. It only wraps the loader the other finders return, so nothing else about the import changes.
    """

    def __init__(self, transformers_loaded: bool) -> None:
        self.pending = set(_REGISTRARS) | (set() if transformers_loaded else {"transformers"})

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname not in self.pending:
            return None
        self.pending.discard(fullname)
        if not self.pending and self in sys.meta_path:
            sys.meta_path.remove(self)
        spec = _find_spec_elsewhere(self, fullname, path, target)
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            exec_module = spec.loader.exec_module
            after = _after_transformers if fullname == "transformers" else _registrar(fullname)

            def exec_then_register(module: Any) -> None:
                exec_module(module)
                after()

            spec.loader.exec_module = exec_then_register  # this loader instance serves this one import
        return spec


def _registrar(module: str) -> Any:
    return lambda: getattr(sys.modules[module], _REGISTRARS[module])()


def _find_spec_elsewhere(hook: Any, fullname: str, path: Any, target: Any) -> Any:
    for finder in sys.meta_path:
        if finder is hook or not hasattr(finder, "find_spec"):
            continue
        spec = finder.find_spec(fullname, path, target)
        if spec is not None:
            return spec
    return None


sys.meta_path.insert(0, _RegistrationHook(transformers_loaded="transformers" in sys.modules))
if "transformers" in sys.modules:
    _after_transformers()
