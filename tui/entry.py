"""``ferryman``: no arguments -> the TUI; a verb -> the scripting interface.

Lives in tui/ because only this package may import Textual; the verbs themselves are in
appliance.cli and never import it.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        from tui.app import run

        return run()
    from appliance.cli import main as cli_main

    return cli_main(args)


if __name__ == "__main__":
    sys.exit(main())
