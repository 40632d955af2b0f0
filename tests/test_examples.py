"""Every example in a public docstring that is written as a doctest (``>>>``) runs and prints what
the docstring says."""
import doctest
import inspect

import pytest
import torch

import selkd_kernels as sk


def _public_objects():
    out = []
    for name in sorted(sk.__all__):
        obj = getattr(sk, name)
        if inspect.isfunction(obj) or inspect.isclass(obj):
            out.append((name, obj))
    return out


PUBLIC = _public_objects()


def test_public_api_is_not_empty():
    assert len(PUBLIC) > 30


def _doctests():
    finder = doctest.DocTestFinder(recurse=False)
    tests = []
    for name, obj in PUBLIC:
        for t in finder.find(obj, name=f"sk.{name}", globs={}):
            if t.examples:
                tests.append(t)
    return tests


DOCTESTS = _doctests()


def test_examples_are_runnable_doctests():
    # most public examples are executable; the rest (snippets inside a user's training loop)
    # name objects only the user has
    assert len(DOCTESTS) >= 20, [t.name for t in DOCTESTS]


@pytest.mark.parametrize("test", DOCTESTS, ids=[t.name for t in DOCTESTS])
def test_docstring_example_runs(test):
    torch.manual_seed(0)
    report = []
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    result = runner.run(test, out=report.append)
    assert result.failed == 0, "".join(report)


@pytest.mark.parametrize("name,obj", PUBLIC, ids=[n for n, _ in PUBLIC])
def test_every_public_callable_has_an_example(name, obj):
    # every public function and class shows its use in its own docstring
    doc = inspect.getdoc(obj) or ""
    assert "Example" in doc, f"sk.{name} has no Example section in its docstring"
