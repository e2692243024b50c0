"""Inputs at the edges: a correct answer or a clear error, never a wrong number or a traceback."""

import json

import numpy as np
import pytest

from hyperref import HyperConfig, InputError, exact_attention, hyper_attention
from hyperref.cli import main


def _huge(dtype, magnitude, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((64, 8)) * magnitude
    k = rng.standard_normal((64, 8)) * magnitude
    v = rng.standard_normal((64, 8))
    return q.astype(dtype), k.astype(dtype), v.astype(dtype)


def _argmax_attention(q, k, v):
    """The limit of softmax attention at huge logits: each row takes the value of its top logit."""
    qs, ks = (x.astype(np.float64) / np.abs(x).max() for x in (q, k))  # same argmax, no overflow
    return v[np.argmax(qs @ ks.T, axis=1)]


@pytest.mark.parametrize("dtype, magnitude", [(np.float32, 1e19), (np.float64, 1e160)])
def test_exact_attention_with_overflowing_logits(dtype, magnitude):
    q, k, v = _huge(dtype, magnitude)
    out = exact_attention(q, k, v, scale=1.0)
    assert out.dtype == dtype and np.isfinite(out).all()
    np.testing.assert_allclose(out, _argmax_attention(q, k, v), rtol=1e-6)


def test_hyper_attention_with_overflowing_float32_logits_is_computed_wider():
    q, k, v = _huge(np.float32, 1e19)
    cfg = HyperConfig(block=64, samples=8, min_seq_len=8)  # one block holds every key: exact
    for engine in ("numpy", "numba"):
        out = hyper_attention(q, k, v, scale=1.0, config=cfg, rng=0, engine=engine)
        assert out.dtype == np.float32
        np.testing.assert_allclose(out, _argmax_attention(q, k, v), rtol=1e-6)


def test_logits_beyond_float64_are_refused():
    q, k, v = _huge(np.float64, 1e160)
    with pytest.raises(InputError, match="float64's range"):
        hyper_attention(q, k, v, scale=1.0, config=HyperConfig(block=64, samples=8, min_seq_len=8), rng=0)


@pytest.fixture
def files(tmp_path):
    np.save(tmp_path / "one.npy", np.zeros(3))
    (tmp_path / "empty.npz").write_bytes(b"")
    return tmp_path


@pytest.mark.parametrize("argv, message", [
    (["--input", "{dir}/one.npy"], "expected an .npz archive"),
    (["--input", "{dir}/empty.npz"], "cannot read"),
    (["--seed", "-1"], "seed"),
])
def test_cli_one_line_errors(files, argv, message, capsys):
    argv = [a.format(dir=files) for a in argv]
    assert main(["run", "--n", "256", "--no-theory"] + argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("[hyperref")]
    assert len(err) == 1 and err[0].startswith("hyperref: error:") and message in err[0]


def test_cli_save_reports_the_file_it_writes(tmp_path, capsys):
    target = tmp_path / "result"
    assert main(["run", "--n", "512", "--min-seq-len", "128", "--block", "64", "--samples", "16",
                 "--no-theory", "--repeats", "1", "--save", str(target), "--json"]) == 0
    saved = json.loads(capsys.readouterr().out)["saved"]
    assert saved == str(target) + ".npz"
    with np.load(saved) as data:
        assert data["out"].shape == (512, 64)


@pytest.mark.parametrize("dtype, big", [(np.float32, 3e38), (np.float64, 1e308)])
def test_values_near_the_dtype_maximum_give_a_finite_answer(dtype, big):
    q, k = np.zeros((2, 2), dtype), np.zeros((4, 2), dtype)
    v = np.full((4, 2), big, dtype)
    np.testing.assert_array_equal(exact_attention(q, k, v), np.full((2, 2), big, dtype))
    cfg = HyperConfig(block=4, samples=4, min_seq_len=1)
    out = hyper_attention(np.zeros((8, 2), dtype), np.zeros((8, 2), dtype), np.full((8, 2), big, dtype),
                          config=cfg, rng=0, engine="numpy")
    assert np.isfinite(out).all()


@pytest.mark.parametrize("rng", [-1, "a", 1.5])
def test_bad_rng_is_named(rng):
    with pytest.raises(InputError, match="rng must be"):
        hyper_attention(np.zeros((8, 2)), np.zeros((8, 2)), np.zeros((8, 2)), rng=rng,
                        config=HyperConfig(min_seq_len=4, block=4, samples=2))


def test_lm_layers_are_checked_before_the_model_loads(capsys):
    assert main(["lm", "--n", "512", "--layers", "bogus"]) == 2
    err = capsys.readouterr().err
    assert "layers must be" in err and "loading the model" not in err
