"""`loco-det` subcommands, one module each: its argument parser and `main(argv)`; `tools/*.py`
are thin wrappers over the same functions (docs/command_line.md)."""
