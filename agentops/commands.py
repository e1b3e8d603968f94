"""What the project's long commands share."""

from __future__ import annotations

import argparse

from django.core.management.base import BaseCommand, CommandParser


class ParagraphsCommand(BaseCommand):
    """A command whose help is written in paragraphs (the benches, chaos): argparse's
    default formatter would run them together."""

    def create_parser(self, prog_name: str, subcommand: str, **kwargs) -> CommandParser:
        parser = super().create_parser(prog_name, subcommand, **kwargs)
        parser.formatter_class = argparse.RawDescriptionHelpFormatter
        return parser
