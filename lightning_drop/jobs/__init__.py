"""The jobs layer: one function per `lightning-drop` command, above the library.

Each job takes typed arguments (the command line's options are derived from its signature and docstring),
checks them before the long work, runs the library, writes its outputs and prints a summary. The library
(every module outside `jobs`, `cli` and `lightning_cli`) never imports this package. Job modules import nothing heavy at module level,
so `lightning-drop --help` stays fast.
"""
