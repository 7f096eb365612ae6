"""Vision transformers (ViT, DINOv2 (+registers), DINOv3 ViT, SwinV2): image data, the report of what a drop
did to an image classifier (`ImageDropReport`), and image throughput.

Training is `DropModule` (a vision family trains as image classification, `lightning_drop.lightning.task`) with
the callbacks of `lightning_drop.callbacks`, the same as for language models.

Surgery, scores and checkpoints of vision families are the core's (`lightning_drop.core.architectures`,
`modeling_dropped`, `importance`, `dropped_checkpoint`): one set of functions for decoders and encoders. Once
`lightning_drop` is imported, the dropped classes of every family are registered with transformers' Auto
classes (when transformers is imported), so `AutoModelForImageClassification.from_pretrained(dir)` (or
`AutoModel` for DINOv3) loads dropped checkpoints.
"""
