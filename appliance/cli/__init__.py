"""``ferryman VERB``: the scripting interface. Every verb takes ``--json``.

Each verb module exposes ``register(sub, common)``; a verb handler takes the parsed
arguments and returns ``Output`` (data for --json, text for people). Errors print one line
that names the object and the fix, and exit non-zero.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from appliance import __version__
from appliance.errors import FerrymanError

EXIT_ERROR = 1
EXIT_USAGE = 2


@dataclass
class Output:
    data: Any
    text: str = ""
    exit_code: int = 0


Handler = Callable[[argparse.Namespace], Output]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        if "invalid choice" in message:
            bad = message.split("'")[1] if "'" in message else message
            message = f"unknown verb '{bad}'; run: {self.prog} --help"
        self.exit(EXIT_USAGE, f"{self.prog}: {message}\n")


def table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def verb_adder(sub: Any, common: argparse.ArgumentParser) -> Callable[..., argparse.ArgumentParser]:
    """``verb(name, handler, help, parent=sub)``: a sub-command that takes ``--json`` and runs
    ``handler``; the one way verb modules declare their verbs."""

    def verb(name: str, handler: Handler, help_: str, parent: Any = sub) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = parent.add_parser(name, help=help_, parents=[common])
        p.set_defaults(handler=handler)
        return p

    return verb


def build_parser() -> argparse.ArgumentParser:
    from appliance.cli import (
        verbs_bootverify,
        verbs_core,
        verbs_evidence,
        verbs_machines,
        verbs_plans,
        verbs_seed,
        verbs_support,
    )

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="machine-readable output")
    parser = _Parser(
        prog="ferryman",
        description="Ferryman: migrate and protect machines into KVM. Without a verb: the TUI.",
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"ferryman {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    for module in (
        verbs_core,
        verbs_machines,
        verbs_plans,
        verbs_support,
        verbs_seed,
        verbs_evidence,
        verbs_bootverify,
    ):
        module.register(sub, common)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return EXIT_USAGE
    as_json = bool(args.json)
    try:
        out: Output = args.handler(args)
    except FerrymanError as e:
        if as_json:
            print(json.dumps({"error": e.to_dict()}))
        else:
            print(f"ferryman: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    try:
        if as_json:
            print(json.dumps(out.data, indent=2, default=str))
        elif out.text:
            print(out.text)
        sys.stdout.flush()
    except BrokenPipeError:  # `ferryman jobs --json | head`: not an error
        sys.stderr.close()
    return out.exit_code
