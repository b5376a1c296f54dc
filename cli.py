"""Command-line plumbing every script shares: checked flag types, --help that shows defaults, one-line errors.

    from cli import ArgumentParser, UserError, add_bool_flag, number, run_main

The rule they serve: a bad input ends the program with a non-zero status and one line that names the flag (or the
file and line) and what to do; a traceback is kept for bugs in the program itself.
"""
if __name__ == "__main__":  # before the imports: a library module answers at once, not after torch loads
    raise SystemExit("cli.py is a library module, not a script: "
                     "every script imports it (see README.md)")
import argparse
import math
import os
import sys


class UserError(Exception):
    """A problem with what the user gave (a flag, a file, a checkpoint): printed as one line by run_main."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the docstring's example commands as written and shows each flag's default (unless its help already
    says what the default is, or there is none)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, argparse.SUPPRESS) or not action.option_strings:
            return text
        default = " ".join(map(str, action.default)) if isinstance(action.default, list) else action.default
        return f"{text} (default: {default})".strip()


class ArgumentParser(argparse.ArgumentParser):
    """argparse with HelpFormatter, whose errors are one line (`prog: error: ... (see --help)`) instead of the usage
    block followed by the error."""

    def __init__(self, *args, formatter_class=HelpFormatter, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def str2bool(value):
    """`--flag`, `--flag=True/False`, `--flag 1/0`, yes/no: argparse's type=bool would read "False" as True."""
    if isinstance(value, bool):
        return value
    lowered = value.lower()
    if lowered in ("1", "true", "yes", "y", "on"):
        return True
    if lowered in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false, 1/0, yes/no), got {value!r}")


def add_bool_flag(parser, name, default=False, help=None):
    parser.add_argument(name, type=str2bool, nargs="?", const=True, default=default, help=help)


def number(kind=float, low=None, high=None, low_open=False, high_open=False):
    """An argparse type: an int or a finite float within [low, high] (an open end with low_open / high_open).

    `--grad_clip -1` then stops at parse time with "argument --grad_clip: must be >= 0, got -1"."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        if low is not None and (value <= low if low_open else value < low):
            raise argparse.ArgumentTypeError(f"must be {'>' if low_open else '>='} {low}, got {text}")
        if high is not None and (value >= high if high_open else value > high):
            raise argparse.ArgumentTypeError(f"must be {'<' if high_open else '<='} {high}, got {text}")
        return value
    parse.__name__ = kind.__name__
    return parse


POSITIVE_INT = number(int, low=1)
NONNEG_INT = number(int, low=0)
POSITIVE = number(float, low=0, low_open=True)
NONNEG = number(float, low=0)


def run_main(main, argv=None):
    """Run a script's main(); a UserError (a DataError is one) ends it with its message on one line and status 2.

    Ctrl-C ends with status 130 and no traceback (the training loop handles it itself, to save a checkpoint)."""
    prog = os.path.basename(sys.argv[0])
    try:
        return main(argv)
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
