"""Subcommands of the ``leanconv`` CLI (see ``leanconv.cli``). Each module
defines NAME, HELP, add_arguments(parser) and run(args) -> exit code."""

__all__: list[str] = []
