"""The ``veclip`` command line: the runner above the library, as ``open_clip_train`` sits above ``open_clip``.

:mod:`~veclip.cli.registry` names the commands (each declared beside its stage), :mod:`~veclip.cli.flags`
derives their flags and builds their configs, :mod:`~veclip.cli.main` parses and runs.
"""

from veclip.cli.main import build_parser, command_reference, main

__all__ = ["build_parser", "command_reference", "main"]
