"""The architecture description (`ArchSpec`, one entry of data per family) and the surgery that drops
sublayers. `architectures`, `decoder_families`, `vision_families` and `modeling_dropped` are copied
next to every dropped checkpoint as its remote code, so they import only the standard library, torch
and transformers. A new family is one entry in `decoder_families.py` or `vision_families.py`.

Nothing is imported here: importing a module of this package loads only what that module needs."""
