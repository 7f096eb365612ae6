"""Lightning: `DropModule`, `TextDataModule`, the FSDP strategy and the `fit|validate|test`
LightningCLI (the callbacks that drive them live in `lightning_drop/callbacks/`).

Nothing is imported here: importing a module of this package loads only what that module needs."""
