"""The commands of ``mirai <command>``: one module (or package) each, with its argparse parser and
``main(argv) -> int``, and only the orchestration a reader wants to see; the work is done by the library.

Commands import the library and this package (``HelpFormatter``), never each other; the library never imports a
command (tests/test_layers.py checks both). The table of commands is in ``mirai.cli``.
"""
from __future__ import annotations

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default after its help only when that says something: not for None, False or empty
    defaults (flags, "not given"), and not when the help already explains the default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if default is None or default is False or default in ("", [], ()) or "default" in text.lower():
            return text
        return super()._get_help_string(action)
