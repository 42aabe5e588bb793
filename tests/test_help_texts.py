"""Every `harness` command's --help renders: argparse formats help strings with %, so one bare '%' in a help
text (as `harness compare --margin` had: "points of %") turns --help into a traceback."""
from __future__ import annotations

import argparse

import pytest

from harness.cli import build_parser


def _parsers(parser: argparse.ArgumentParser, path=()):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _parsers(child, (*path, name))


PARSERS = list(_parsers(build_parser()))


def test_every_command_is_reached():
    names = {" ".join(path) for path, _ in PARSERS}
    assert {"run", "compare", "build", "export", "convert", "clicks", "train distill", "train finetune"} <= names


@pytest.mark.parametrize("path, parser", PARSERS, ids=[" ".join(p) or "harness" for p, _ in PARSERS])
def test_help_renders(path, parser):
    text = parser.format_help()
    assert text.startswith("usage: ") and "-h, --help" in text
