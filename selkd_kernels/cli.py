"""``selkd`` console script: ``selkd demo ...`` (the end-to-end job) and ``selkd bench ...``
(the benchmark harness). Sub-commands are imported only when used."""
from __future__ import annotations

import importlib
import sys

_COMMANDS = {
    "demo": ("selkd_kernels.apps.demo", "teacher assessment and cross-task distillation, end to end"),
    "bench": ("selkd_kernels.benchmarking.cli", "benchmark every backend against the references"),
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: selkd {demo,bench} [options]\n")
        for name, (_, doc) in _COMMANDS.items():
            print(f"  {name:6s} {doc}")
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd not in _COMMANDS:
        print(f"selkd: unknown command {cmd!r}; choose from {sorted(_COMMANDS)}", file=sys.stderr)
        return 2
    mod = importlib.import_module(_COMMANDS[cmd][0])
    return int(mod.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
