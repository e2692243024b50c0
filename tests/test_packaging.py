"""The installed package: one top-level name, ``hyperref``, with ``hyperref.theory`` and ``hyperref.gpu``."""

import doctest
import importlib
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_only_hyperref_is_installed_at_the_top(tmp_path):
    # run outside the checkout, so that the repository's folders are not on sys.path
    code = ("import importlib.util as u, hyperref.theory, hyperref.gpu;"
            "print(u.find_spec('theory') is None, u.find_spec('gpu') is None)")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "True"]


def test_a_users_own_theory_and_gpu_modules_do_not_shadow_the_package(tmp_path):
    (tmp_path / "theory.py").write_text("raise ImportError('the user module was imported')\n")
    (tmp_path / "gpu.py").write_text("raise ImportError('the user module was imported')\n")
    code = "import hyperref.theory.bounds, hyperref.theory.parameters; print('ok')"
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_no_source_imports_the_old_top_level_names():
    pattern = re.compile(r"^\s*(import|from)\s+(gpu|theory)\b", re.M)
    sources = [p for folder in ("hyperref", "theory", "gpu", "tests", "benchmarks", "notebooks")
               for p in (ROOT / folder).rglob("*") if p.suffix in (".py", ".ipynb")]
    sources += [ROOT / "README.md"]
    offenders = [str(p.relative_to(ROOT)) for p in sources
                 if pattern.search(p.read_text().replace('\\n', '\n').replace('"', ''))]
    assert offenders == []


@pytest.mark.parametrize("name", ["hyperref.theory.bounds", "hyperref.theory.parameters",
                                  "hyperref.theory.symbolic"])
def test_subpackage_doctests(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0


def test_version_and_module_entry_point():
    import hyperref

    for argv in ([sys.executable, "-m", "hyperref", "--version"],):
        done = subprocess.run(argv, capture_output=True, text=True)
        assert done.returncode == 0 and done.stdout.strip() == f"hyperref {hyperref.__version__}"


def test_license_citation_and_typing_marker_ship():
    assert "MIT" in (ROOT / "LICENSE").read_text()
    assert "2310.05869" in (ROOT / "CITATION.cff").read_text()
    assert (ROOT / "hyperref" / "py.typed").exists()


def test_one_error_vocabulary_across_engines():
    from hyperref import InputError
    from hyperref.theory import bounds

    with pytest.raises(InputError):
        bounds.g2_bound(-1, 0.1, 2.0, 2.0)
    assert issubclass(InputError, ValueError) and issubclass(InputError, TypeError)
    torch = pytest.importorskip("torch")
    pytest.importorskip("triton")
    from hyperref import gpu

    q = torch.zeros(1, 1, 8, 16)
    with pytest.raises(InputError):
        gpu.hyper_attention(q, q, q, causal="no")
