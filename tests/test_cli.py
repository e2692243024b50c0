import json
import subprocess
import sys

import numpy as np
import pytest

from hyperref.cli import main

SMALL = ["--n", "1024", "--d", "16", "--block", "64", "--samples", "64", "--min-seq-len", "256"]
REQUIRED = {"n", "d", "causal", "config", "alpha", "kappa", "srank_p", "srank_v", "error_op",
            "error_fro", "time_hyper_s", "time_exact_s"}


@pytest.mark.parametrize("causal", [[], ["--causal"]])
def test_json_report_has_documented_keys(capsys, causal):
    assert main(["run"] + SMALL + causal + ["--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert REQUIRED <= set(report)
    assert report["n"] == 1024 and report["d"] == 16 and report["causal"] == bool(causal)
    assert report["config"]["block"] == 64
    assert 0 < report["error_op"] < 10 and 0 < report["error_fro"]
    assert report["alpha"] >= 1 and report["srank_v"] <= 16 + 1e-9


def test_bare_options_mean_run_and_table(capsys):
    assert main(SMALL) == 0
    out = capsys.readouterr().out
    assert "error_op" in out and "srank(P)" in out


def test_input_and_save_roundtrip(tmp_path, capsys):
    rng = np.random.default_rng(0)
    q, k, v = rng.standard_normal((3, 1, 2, 300, 8))
    np.savez(tmp_path / "in.npz", q=q, k=k, v=v)
    assert main(["run", "--input", str(tmp_path / "in.npz"), "--min-seq-len", "100",
                 "--block", "32", "--samples", "32", "--save", str(tmp_path / "o.npz"),
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["batch_shape"] == [1, 2]
    saved = np.load(tmp_path / "o.npz")
    assert saved["out"].shape == (1, 2, 300, 8) and saved["lse"].shape == (1, 2, 300)


def _bad_npz(tmp_path, **arrays):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    return str(path)


@pytest.mark.parametrize("make_args,needle", [
    (lambda p: ["run", "--n", "0"], "positive integer"),
    (lambda p: ["run", "--n", "abc"], "positive integer"),
    (lambda p: ["run", "--estimator", "exact"], "invalid choice"),
    (lambda p: ["run", "--bits", "40"], "bits"),
    (lambda p: ["run", "--input", str(p / "nope.npz")], "cannot read"),
    (lambda p: ["run", "--input", _bad_npz(p, q=np.ones((4, 2)), k=np.ones((4, 2)))], "missing"),
    (lambda p: ["run", "--input", _bad_npz(p, q=np.ones((4, 2)), k=np.ones((4, 3)),
                                           v=np.ones((4, 2)))], "head dimension"),
    (lambda p: ["run", "--input", _bad_npz(p, q=np.full((4, 2), np.nan), k=np.ones((4, 2)),
                                           v=np.ones((4, 2)))], "NaN"),
    (lambda p: ["run", "--input", _bad_npz(p, q=np.ones((2, 4, 2)), k=np.ones((2, 4, 2)),
                                           v=np.ones((2, 4, 2)))], "(B, H, N, D)"),
    (lambda p: ["frobnicate"], "invalid choice"),
])
def test_bad_input_one_line_exit_2(tmp_path, capsys, make_args, needle):
    assert main(make_args(tmp_path)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("hyperref: error:")
    assert needle in err


def test_console_script_exit_code():
    proc = subprocess.run([sys.executable, "-m", "hyperref.cli", "run", "--d", "-3"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_no_theory_skips_the_parameters_and_json_stays_strict(capsys):
    assert main(["run", "--n", "512", "--min-seq-len", "128", "--block", "64", "--samples", "64",
                 "--no-theory", "--repeats", "1", "--json"]) == 0
    out, err = capsys.readouterr()
    report = json.loads(out)  # strict: json.loads accepts Infinity, so also check the text
    assert "Infinity" not in out and "NaN" not in out
    assert report["alpha"] is None and report["error_op"] is None and report["bounds"] is None
    assert 0 < report["error_fro"] < 1
    assert "[hyperref run]" in err and "warm-up" in err


def test_infinite_values_are_printed_as_null():
    from hyperref.cli import _finite_or_none

    assert _finite_or_none({"a": float("inf"), "b": [1.0, float("nan")], "c": "x"}) == \
        {"a": None, "b": [1.0, None], "c": "x"}


def test_version(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out.startswith("hyperref ")
