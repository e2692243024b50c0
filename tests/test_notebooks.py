"""The notebooks' .ipynb files are in sync with their py:percent sources (the truth)."""

import pathlib

import pytest

jupytext = pytest.importorskip("jupytext")

NOTEBOOKS = sorted((pathlib.Path(__file__).parent.parent / "notebooks").glob("*.py"))


def _cells(nb):
    return [(c.cell_type, c.source.strip()) for c in nb.cells]


@pytest.mark.parametrize("source", NOTEBOOKS, ids=lambda p: p.stem)
def test_ipynb_in_sync_with_source(source):
    paired = source.with_suffix(".ipynb")
    assert paired.exists(), f"{paired.name} missing: run jupytext --sync {source}"
    assert _cells(jupytext.read(source)) == _cells(jupytext.read(paired))


def test_there_are_seven_notebooks():
    assert len(NOTEBOOKS) == 7
