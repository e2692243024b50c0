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


def _documented_objects():
    """The objects docs/api/*.rst documents: ``auto*`` directives, and the public members with a
    docstring of each ``automodule`` with a bare ``:members:`` (less its ``:exclude-members:``)."""

    def resolve(dotted):
        parts = dotted.split(".")
        for cut in range(len(parts), 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:cut]))
            except ImportError:
                continue
            for name in parts[cut:]:
                obj = getattr(obj, name)
            return obj
        raise ImportError(dotted)

    found = []
    for page in sorted((ROOT / "docs" / "api").glob("*.rst")):
        lines, current = page.read_text().splitlines(), None
        for i, line in enumerate(lines):
            m = re.match(r"\.\. (currentmodule|automodule|auto\w+)::\s*(\S+)", line)
            if m is None:
                continue
            kind, target = m.groups()
            if kind == "currentmodule":
                current = target
            elif kind == "automodule":
                options = {}
                for opt in lines[i + 1:]:
                    o = re.match(r"\s+:([\w-]+):\s*(.*)", opt)
                    if o is None:
                        break
                    options[o.group(1)] = {n.strip() for n in o.group(2).split(",") if n.strip()}
                module = importlib.import_module(target)
                listed = options.get("members")
                if listed:
                    found += [getattr(module, n) for n in listed]
                elif listed is not None:
                    found += [obj for n, obj in vars(module).items()
                              if not n.startswith("_") and n not in options.get("exclude-members", ())
                              and getattr(obj, "__module__", None) == target and obj.__doc__]
            else:
                found.append(resolve(f"{current}.{target}" if current and "." not in target else target))
    return found


@pytest.mark.parametrize("package", ["hyperref", "hyperref.theory", "hyperref.gpu"])
def test_the_api_reference_covers_every_export(package):
    # the docs build (-W) checks that what the pages name exists; this checks that nothing is left out
    if package == "hyperref.gpu":
        pytest.importorskip("torch")
        pytest.importorskip("triton")
    module = importlib.import_module(package)
    documented = {id(obj) for obj in _documented_objects()}
    assert [name for name in module.__all__ if id(getattr(module, name)) not in documented] == []


def test_the_public_signatures_are_annotated():
    import inspect

    import hyperref
    from hyperref import presets

    functions = [getattr(hyperref, name) for name in hyperref.__all__] + [presets.paper, presets.causal_lm]
    try:
        import hyperref.gpu as gpu
    except ImportError:  # the gpu extra is not installed
        pass
    else:
        functions += [gpu.hyper_attention, gpu.scaled_dot_product_attention,
                      gpu.HyperAttention.__init__, gpu.HyperAttention.forward]
    functions = [f for f in functions if inspect.isfunction(f)]
    missing = [f"{f.__qualname__}({name})" for f in functions
               for name, p in inspect.signature(f).parameters.items()
               if name != "self" and p.annotation is inspect.Parameter.empty]
    missing += [f"{f.__qualname__} -> ?" for f in functions
                if inspect.signature(f).return_annotation is inspect.Signature.empty]
    assert missing == []
