"""``selkd`` console script: one sub-command per job, each imported only when it runs.

``selkd --help`` lists them, ``selkd COMMAND --help`` shows a command's options.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from ._version import __version__

# name -> (module with main(argv) -> int, one line of help)
COMMANDS = {
    "demo": ("selkd_kernels.apps.demo",
             "teacher assessment and cross-task distillation, end to end (extra [demo])"),
    "bench": ("selkd_kernels.benchmarking.cli",
              "benchmark every backend against the references (extra [bench] for POT and plots)"),
}

EPILOG = """examples:
  selkd demo --quick                     # the main job, small
  selkd bench --quick --out /tmp/bench   # every benchmark provider once
  selkd bench --help                     # a command's options, with their defaults
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="selkd", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="selkd-kernels: optimal-transport knowledge distillation in PyTorch.\n"
                    "Each command below has its own options: selkd COMMAND --help.")
    p.add_argument("--version", action="version", version=f"selkd-kernels {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for name, (_, doc) in COMMANDS.items():
        # the command parses its own options (and its own --help)
        sub.add_parser(name, help=doc, add_help=False)
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args, rest = parser.parse_known_args(argv)
    except SystemExit as exc:  # --help, --version or a usage error
        return int(exc.code or 0)
    if args.command is None:  # nothing to do: say what can be done
        parser.print_help(sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[args.command][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
