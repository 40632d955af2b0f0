"""The README tells the truth: its API table matches the signatures, its training-loop example
runs, its Quick start has the shape CI reads, and ``available_backends()`` lists only backends
that run here.

``python -m tests.test_readme`` prints the API table with every signature cell re-rendered from
the code (descriptions kept), to paste into README.md after an API change.
"""
from __future__ import annotations

import dataclasses
import inspect
import os
import re
import subprocess
import sys

import pytest
import torch

import selkd_kernels as sk

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")


def _readme() -> str:
    with open(README, encoding="utf-8") as fh:
        return fh.read()


def section(text: str, title: str) -> str:
    """The body of the ``##``/``###`` section called ``title`` (up to the next heading of the
    same or a higher level; ``#`` lines inside fenced code are not headings)."""
    lines, body, level, fenced = text.splitlines(keepends=True), [], None, False
    for line in lines:
        if line.startswith("```"):
            fenced = not fenced
        m = None if fenced else re.match(r"(#+) (.*?)\s*$", line)
        if level is None:
            if m and m.group(2) == title:
                level = len(m.group(1))
            continue
        if m and len(m.group(1)) <= level:
            break
        body.append(line)
    assert level is not None, f"README.md has no section {title!r}"
    return "".join(body)


def fenced_blocks(text: str, lang: str | None = None) -> list[str]:
    blocks = re.findall(r"^```(\w*)\n(.*?)^```", text, re.MULTILINE | re.DOTALL)
    return [body for tag, body in blocks if lang is None or tag == lang]


# ----------------------------------------------------------------------------- API table

def _default(obj, param) -> str:
    if dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            if f.name == param.name and f.default_factory is not dataclasses.MISSING:
                return f"{f.default_factory.__name__}()"
    return repr(param.default)


def render(name: str) -> str:
    """``sk.name(args)`` as the README writes it: names, ``*`` before keyword-only arguments,
    defaults by repr, no annotations."""
    obj = getattr(sk, name)
    parts, star = [], False
    for p in inspect.signature(obj).parameters.values():
        if p.kind is p.KEYWORD_ONLY and not star:
            parts.append("*")
            star = True
        if p.kind is p.VAR_POSITIONAL:
            parts.append("*" + p.name)
            star = True
        elif p.kind is p.VAR_KEYWORD:
            parts.append("**" + p.name)
        else:
            parts.append(p.name if p.default is p.empty else f"{p.name}={_default(obj, p)}")
    return f"sk.{name}({', '.join(parts)})"


def api_rows(text: str) -> list[tuple[list[str], str]]:
    """(items of the first cell, rest of the row) for each row of the API table."""
    rows = []
    for line in section(text, "API").splitlines():
        if not line.startswith("| `sk."):
            continue
        first, rest = line[2:].split(" | ", 1)
        rows.append((re.findall(r"`([^`]*)`", first), rest))
    return rows


def _item_name(item: str) -> str:
    m = re.fullmatch(r"sk\.(\w+)(\(.*\))?", item)
    assert m, f"API table item {item!r} is not `sk.name` or `sk.name(...)`"
    return m.group(1)


def test_api_table_signatures_match_the_code():
    rows = api_rows(_readme())
    assert len(rows) >= 10
    wrong = []
    for items, _ in rows:
        for item in items:
            name = _item_name(item)
            assert hasattr(sk, name), f"README lists sk.{name}, which does not exist"
            if "(" in item and item != render(name):
                wrong.append(f"README: {item}\ncode:   {render(name)}")
    assert not wrong, "API table differs from the signatures (python -m tests.test_readme):\n" + \
        "\n".join(wrong)


def test_api_table_lists_every_public_name():
    listed = {_item_name(i) for items, _ in api_rows(_readme()) for i in items}
    missing = sorted(set(sk.__all__) - listed - {"__version__"})
    assert not missing, f"public names missing from the README API table: {missing}"


def test_the_table_checker_can_fail():
    # a signature missing one keyword is caught, so the check above is not vacuous
    assert render("sinkhorn") != render("sinkhorn").replace(", check_marginals=True", "")
    assert "check_marginals" in render("sinkhorn") and "return_stats" in render("sinkhorn_kd_loss")


def regenerate_table(text: str) -> str:
    lines = ["| name | what |", "|---|---|"]
    for items, rest in api_rows(text):
        cells = [f"`{render(_item_name(i))}`" if "(" in i else f"`{i}`" for i in items]
        lines.append(f"| {', '.join(cells)} | {rest}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- examples

def test_training_loop_example_runs(capsys):
    """Every Python block of "Using the loss in a training loop", run in order as one script."""
    code = "\n".join(fenced_blocks(section(_readme(), "Using the loss in a training loop"),
                                   "python"))
    assert "TeacherOutputs" in code and "SinkhornKDLoss" in code and "remap" in code
    namespace = {"__name__": "readme_example"}
    exec(compile(code, "README.md:training-loop", "exec"), namespace)  # noqa: S102
    out = capsys.readouterr().out
    accs = [float(x) for x in re.findall(r"test accuracy ([\d.]+)%", out)]
    assert len(accs) == 2 and all(acc > 50 for acc in accs), out  # chance is 16.7%
    assert "ranking: ['trained on 0-5', 'untrained']" in out, out


def test_quick_start_has_one_block_of_two_commands():
    # .ci/run executes the second line of this block in a fresh environment
    blocks = fenced_blocks(section(_readme(), "Quick start"))
    assert len(blocks) == 1
    commands = [ln for ln in blocks[0].splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert len(commands) == 2
    assert "selkd demo" in commands[0] and "pytest" in commands[1]
    for cmd in commands:
        # without these pins a Python 3.11 venv's setuptools 65 cannot read the license field
        assert '"setuptools>=77"' in cmd and "--no-build-isolation" in cmd


def test_available_backends_run_here():
    """Each listed backend solves a small problem on this machine (triton only with a GPU)."""
    names = sk.available_backends()
    assert names[0] == "torch"
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        assert "triton" not in names  # (under the interpreter, tests run it on CPU tensors)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.full((2, 3), 1 / 3, device=device)
    b = torch.full((2, 4), 1 / 4, device=device)
    cost = torch.rand(3, 4, device=device)
    ref = sk.sinkhorn(a, b, cost, backend="torch").loss
    for name in names:
        if name == "cpp" and device != "cpu":
            continue
        out = sk.sinkhorn(a, b, cost, backend=name).loss
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the claim is about machines without a GPU")
def test_triton_not_listed_without_a_gpu():
    # a fresh process without the test suite's TRITON_INTERPRET=1, as a user would run it
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = "import selkd_kernels as sk; print(sk.available_backends(), " \
           "sk.available_partial_ot_backends())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=300, check=False)
    assert out.returncode == 0, out.stderr
    assert "triton" not in out.stdout and "torch" in out.stdout


if __name__ == "__main__":
    sys.stdout.write(regenerate_table(_readme()) + "\n")
