"""How the command-line help is laid out."""

from __future__ import annotations

import argparse
import textwrap


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """argparse's help, with a paragraph of prose (a description) wrapped to the terminal
    without breaking at hyphens, so options such as ``--dir`` stay whole, and text with line
    breaks of its own (examples) kept as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return super()._fill_text(text, width, indent)
        return textwrap.fill(
            " ".join(text.split()),
            width,
            initial_indent=indent,
            subsequent_indent=indent,
            break_on_hyphens=False,
        )
