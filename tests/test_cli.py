"""The ``selkd`` command line: the top-level help lists every command, ``--version`` works,
``selkd bench`` documents every option with its default, and a missing optional dependency
(matplotlib) degrades the report instead of crashing after the run."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from selkd_kernels import __version__, cli
from selkd_kernels.benchmarking import cli as bench_cli
from selkd_kernels.benchmarking import report


def test_help_lists_every_command_with_one_line(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name, (_, doc) in cli.COMMANDS.items():
        line = next(ln for ln in out.splitlines() if ln.strip().startswith(name + " "))
        assert doc.split()[0] in line, line
    assert "examples:" in out and "--version" in out


def test_version(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"selkd-kernels {__version__}"


def test_no_command_and_unknown_command_are_usage_errors(capsys):
    assert cli.main([]) == 2
    assert "commands" in capsys.readouterr().err
    assert cli.main(["fly"]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_console_script_module_runs():
    out = subprocess.run([sys.executable, "-m", "selkd_kernels.cli", "--version"],
                         capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0 and __version__ in out.stdout


def test_command_options_reach_the_command(capsys):
    assert cli.main(["bench", "--list"]) == 0
    out = capsys.readouterr().out
    assert "workloads:" in out and "providers on cpu:" in out


def test_bench_help_documents_every_option_with_defaults(capsys):
    parser = bench_cli.build_parser()
    for action in parser._actions:
        assert action.help, f"{action.option_strings} has no help"
    assert cli.main(["bench", "--help"]) == 0
    out = capsys.readouterr().out
    options = out[out.index("options:"):]
    for option, default in (("--repeats", 15), ("--seed", 0), ("--dtype", "float32"),
                            ("--budget", 60.0), ("--mem-cap-gb", 8.0)):
        block = options[options.index("  " + option + " "):]
        assert f"(default: {default})" in block[:400], option
    assert "(default: None)" not in out and "(default: False)" not in out
    assert "examples:" in out and "selkd bench --quick" in out


def test_bench_usage_errors_return_2(capsys):
    assert bench_cli.main(["--threads", "0"]) == 2
    assert "--threads" in capsys.readouterr().err
    assert bench_cli.main(["--workloads", "nope"]) == 2


def _tiny_run(tmp_path):
    return ["--quick", "--workloads", "none", "--sweep", "batch", "--ops", "sinkhorn",
            "--providers", "reference", "--out", str(tmp_path)]


def test_bench_without_matplotlib_writes_tables_and_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(report, "plotting_available", lambda: False)
    assert bench_cli.main(_tiny_run(tmp_path)) == 0
    captured = capsys.readouterr()
    assert "matplotlib is not installed" in captured.err
    assert "selkd-kernels[bench]" in captured.err
    assert json.loads((tmp_path / "results.json").read_text())["results"]
    assert (tmp_path / "results.csv").exists() and not list(tmp_path.glob("*.png"))


def test_plotting_without_matplotlib_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import raises ImportError
    with pytest.raises(ImportError, match=r"selkd-kernels\[bench\]"):
        report._plt()


def test_bench_with_matplotlib_draws_the_plots(tmp_path):
    pytest.importorskip("matplotlib")
    assert bench_cli.main(_tiny_run(tmp_path)) == 0
    assert list(tmp_path.glob("sweep_batch_sinkhorn.png"))
