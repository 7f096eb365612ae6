"""Reading and writing: dropped checkpoints, Lightning's training checkpoints, safetensors, the one
atomic writer, model references and text calibration data, Nemotron-NAS layouts, teacher logits.

Nothing is imported here: importing a module of this package loads only what that module needs."""
