"""Fuzzing the command line: exit code 0 with a correct report, or 2 with one ``hyperref: error:`` line.

``hyperref.cli.main([...])`` is called with generated arguments, each either valid (small
sizes, every option value) or broken in one way; inputs come from generated ``.npz`` files.
A valid run whose configuration is exact (``--min-seq-len >= n``, or one key block holding every
key) must report ``error_fro`` at the rounding level of float32 (the tolerance of tests/fuzz.py).
"""

import contextlib
import io
import json
import math
import os
import tempfile

import numpy as np
from hypothesis import given, settings, strategies as st

from hyperref import exact_attention
from hyperref.cli import main
from hyperref.workloads import planted_workload

from .fuzz import examples, logit_perturbation, max_abs, record, softmax_tolerance, verdict


def _call(argv):
    """``(exit code, stdout, stderr lines that are not progress lines)``; exceptions propagate."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as exc:  # argparse's --help and --version
            rc = exc.code
    lines = [line for line in err.getvalue().splitlines() if not line.startswith("[hyperref")]
    return rc, out.getvalue(), lines


def _expect_usage_error(argv, why):
    try:
        rc, _, lines = _call(argv)
    except Exception as exc:  # noqa: BLE001
        record("unclear")
        raise AssertionError(f"hyperref {' '.join(argv)} ({why}) crashed: {type(exc).__name__}: {exc}") from exc
    if rc == 0:
        record("wrong")
        raise AssertionError(f"hyperref {' '.join(argv)} ({why}) exited 0")
    one_line = rc == 2 and len(lines) == 1 and lines[0].startswith("hyperref: error: ")
    record("clear error" if one_line else "unclear")
    assert one_line, (argv, why, rc, lines)
    assert "loading the model" not in " ".join(lines)


#: arrays written to --input files: (name, maker(rng) -> dict of arrays or bytes, valid)
def _inputs(rng, n, d):
    q, k, v = (rng.standard_normal((n, d)).astype(np.float32) for _ in range(3))
    bad_q = q.copy()
    bad_q[0, 0] = np.nan
    return {
        "single": (dict(q=q, k=k, v=v), True),
        "float64 batched GQA": (dict(q=rng.standard_normal((1, 2, n, d)), k=rng.standard_normal((1, 1, n + 1, d)),
                                     v=rng.standard_normal((1, 1, n + 1, 3))), True),
        "float16": (dict(q=q.astype(np.float16), k=k.astype(np.float16), v=v.astype(np.float16)), True),
        "nan": (dict(q=bad_q, k=k, v=v), False),
        "int": (dict(q=q.astype(np.int64), k=k, v=v), False),
        "complex": (dict(q=q, k=k.astype(np.complex64), v=v), False),
        "3-d": (dict(q=q[None], k=k[None], v=v[None]), False),
        "d mismatch": (dict(q=q, k=k[:, :1] if d > 1 else np.zeros((n, 2), np.float32), v=v), False),
        "missing v": (dict(q=q, k=k), False),
        "no keys": (dict(q=q, k=k[:0], v=v[:0]), False),
        "zero heads": (dict(q=np.zeros((1, 0, n, d)), k=np.zeros((1, 0, n, d)), v=np.zeros((1, 0, n, d))), False),
        "object": (dict(q=np.array([None, 1.0], dtype=object), k=k, v=v), False),
        "empty file": (b"", False),
        "text file": (b"q,k,v\n1,2,3\n", False),
        "npy": ("npy", False),
        "missing file": (None, False),
    }


@st.composite
def run_argv(draw, directory):
    """``(argv, why invalid or None, (n, d, seed, exact, input arrays))`` for ``hyperref run``."""
    n, d = draw(st.integers(1, 40)), draw(st.integers(1, 6))
    seed = draw(st.sampled_from([0, 1, 2**40, 2**70]))
    argv, why = ["run", "--no-theory"] if draw(st.booleans()) else ["run"], []
    arrays = None
    if draw(st.booleans()):
        name = draw(st.sampled_from(sorted(_inputs(np.random.default_rng(0), n, d))))
        content, valid = _inputs(np.random.default_rng(seed % 2**32), n, d)[name]
        path = os.path.join(directory, "in.npz")
        if content is None:
            path = os.path.join(directory, "absent.npz")
        elif content == "npy":
            path = os.path.join(directory, "in.npy")
            np.save(path, np.zeros(3))
        elif isinstance(content, bytes):
            with open(path, "wb") as fh:
                fh.write(content)
        else:
            np.savez(path, **content)
            arrays = content if valid else None
        argv += ["--input", path]
        if not valid:
            why.append(f"input {name}")
    else:
        argv += ["--n", str(n), "--d", str(d)]
    argv += ["--seed", str(seed)]
    nq = arrays["q"].shape[-2] if arrays else n
    nk = arrays["k"].shape[-2] if arrays else n
    block = draw(st.sampled_from([1, 4, nk, nk + 3, 2**62]))
    min_seq_len = draw(st.sampled_from([1, 3, max(1, nq - 1), nq, 2**62]))
    estimator = draw(st.sampled_from(["masked", "paper"]))
    samples = draw(st.sampled_from([1, 8, 64, 2**40]))
    if samples == 2**40 and nq > min_seq_len:
        why.append("draws beyond memory")
    argv += ["--block", str(block), "--min-seq-len", str(min_seq_len), "--estimator", estimator,
             "--samples", str(samples), "--bits", str(draw(st.integers(1, 30))),
             "--sampler", draw(st.sampled_from(["rownorm", "uniform", "mixed"])),
             "--normalizer", draw(st.sampled_from(["self", "approxd"])),
             "--engine", draw(st.sampled_from(["numpy", "numba"])), "--repeats", "1"]
    causal = draw(st.booleans())
    if causal:
        argv.append("--causal")
    if draw(st.booleans()):
        argv += ["--save", os.path.join(directory, "out")]
    broken = draw(st.sampled_from([None] * 24 + [
        ("--n", "0"), ("--n", "-5"), ("--n", "abc"), ("--n", ""), ("--n", "1e3"), ("--d", "0"),
        ("--seed", "-1"), ("--seed", "x"), ("--block", "0"), ("--samples", "0"), ("--bits", "31"),
        ("--bits", "0"), ("--min-seq-len", "-2"), ("--estimator", "foo"), ("--sampler", "gauss"),
        ("--normalizer", ""), ("--engine", "cuda"), ("--repeats", "0"), ("--save", "/nonexistent/dir/out"),
        ("--mode", "direct"), ("--block", "99999999999999999999999"), ("--n", str(10**12)), ("--n",),
        ("--bogus",)]))
    if broken == ("--n", str(10**12)) and arrays is not None:
        broken = None  # with --input the workload's --n is not used
    if broken:
        argv += list(broken)
        why.append(" ".join(broken))
    exact = estimator == "masked" and nq > 0 and (nq <= min_seq_len or block >= nk) or nq <= min_seq_len
    return argv, "; ".join(why) or None, (n, d, seed, exact, arrays, causal)


@settings(max_examples=examples(100))
@given(st.data())
def test_run_exits_0_with_a_correct_report_or_2_with_one_line(data):
    with tempfile.TemporaryDirectory() as directory:
        argv, why, (n, d, seed, exact, arrays, causal) = data.draw(run_argv(directory), label="argv")
        if why:
            _expect_usage_error(argv + ["--json"], why)
            return
        try:
            rc, out, lines = _call(argv + ["--json"])
        except Exception as exc:  # noqa: BLE001
            record("unclear")
            raise AssertionError(f"hyperref {' '.join(argv)} crashed: {type(exc).__name__}: {exc}") from exc
        if rc != 0:
            record("unclear")
            raise AssertionError(f"hyperref {' '.join(argv)}: exit {rc}, {lines}")
        report = json.loads(out)
        if not exact:
            verdict(report["error_fro"] is not None and math.isfinite(report["error_fro"]),
                    f"error_fro {report['error_fro']}")
            return
        # exact configuration: error_fro at the rounding level of the dtype
        q, k, v = (arrays[x] for x in "qkv") if arrays else planted_workload(n, d, rng=seed)
        work = np.result_type(q.dtype, k.dtype, v.dtype, np.float32)
        want = exact_attention(q, k, v, causal=causal)
        s = 1 / math.sqrt(q.shape[-1])
        tol = softmax_tolerance(2 * logit_perturbation(q, k, s, work), k.shape[-2] + 64, max_abs(v), work)
        norm = float(np.linalg.norm(want.astype(np.float64)))
        bound = tol * math.sqrt(want.size) / norm if norm else 0.0
        verdict(report["error_fro"] <= bound, f"hyperref {' '.join(argv)}: error_fro {report['error_fro']} "
                                               f"> {bound:.3g} in an exact configuration")


LM_BROKEN = [("--n", "7"), ("--n", "0"), ("--n", "2"), ("--n", "x"), ("--layers", "bogus"), ("--layers", "last:"),
             ("--layers", "0,,3"), ("--exact-set", "foo(3)"), ("--exact-set", "sinks(0)"), ("--exact-set", ""),
             ("--exact-set", "window(2.5)"), ("--samples", "-1"), ("--query-block", "0"), ("--seed", "-1"),
             ("--device", "tpu"), ("--text", "/nonexistent.txt"), ("--sampler", "foo"), ("--min-seq-len", "0")]


@settings(max_examples=examples(40))
@given(st.lists(st.sampled_from(LM_BROKEN), min_size=1, max_size=3),
       st.lists(st.sampled_from([("--copy",), ("--json",), ("--samples", "16"), ("--n", "64"),
                                 ("--layers", "last:2"), ("--device", "cpu")]), max_size=2),
       st.randoms())
def test_lm_argument_errors_are_one_line_before_the_model_loads(broken, fine, random):
    """Each of these is checked before the model loads: exit 2, one line, nothing loaded."""
    pieces = broken + fine
    random.shuffle(pieces)
    # a later valid value of the same option would override the broken one: keep broken last
    names = {b[0] for b in broken}
    pieces = [p for p in pieces if p in broken or p[0] not in names]
    _expect_usage_error(["lm"] + [a for p in pieces for a in p], "broken lm argument")


@settings(max_examples=examples(20))
@given(st.lists(st.one_of(st.text(max_size=6), st.sampled_from(["run", "lm", "--n", "-", "--", "-h", "bogus"])),
                min_size=1, max_size=3))
def test_other_command_lines(argv):
    """Arbitrary words: an unknown command or option is exit 2 with one line; help/version exit 0."""
    if argv[0] in ("run",) or (argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version")):
        argv = ["bogus"] + argv  # never start a real run (`hyperref` alone runs n = 16384)
    if argv[0] == "lm" and len(argv) == 1:
        argv = argv + ["--n", "7"]
    if argv[0] == "lm":
        argv = argv + ["--device", "tpu"]  # refused before the model loads
    try:
        rc, _, lines = _call(argv)
    except Exception as exc:  # noqa: BLE001
        record("unclear")
        raise AssertionError(f"hyperref {argv} crashed: {type(exc).__name__}: {exc}") from exc
    if rc == 0:  # only help and version (argparse also takes unambiguous prefixes: --he, --vers)
        asked = any(a == "-h" or (len(a) >= 3 and ("--help".startswith(a) or "--version".startswith(a)))
                    for a in argv)
        verdict(asked, f"hyperref {argv} exited 0")
        return
    one_line = rc == 2 and len(lines) == 1 and lines[0].startswith("hyperref: error: ")
    record("clear error" if one_line else "unclear")
    assert one_line, (argv, rc, lines)


def test_a_workload_beyond_memory_is_one_line():
    """``--n 10**12`` (466 TiB of float64 draws for the workload) is an error line, not a traceback."""
    _expect_usage_error(["run", "--n", str(10**12), "--no-theory"], "workload beyond memory")
    _expect_usage_error(["run", "--n", "8", "--d", str(10**12), "--no-theory"], "workload beyond memory")


def test_control_characters_in_arguments_stay_on_one_line():
    """An argument holding a form feed or a newline is quoted escaped in the one error line."""
    _expect_usage_error(["lm", "\x0c", "--device", "tpu"], "form feed argument")
    _expect_usage_error(["run", "--n", "4\n2"], "newline in a value")
