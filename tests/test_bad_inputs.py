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


def _draws(cfg, n=64, causal=False, rng=0):
    from hyperref import make_draws

    return make_draws(cfg, n, n, 8, causal=causal, rng=rng)


def test_hand_built_draws_are_checked():
    from dataclasses import replace

    rng = np.random.default_rng(0)
    q, k, v = rng.standard_normal((3, 64, 8))
    cfg = HyperConfig(block=16, samples=8, min_seq_len=8, normalizer="approxd", approxd_samples=8)
    good = _draws(cfg)
    block = good.blocks[""]
    bad = {
        "approxd_cols": replace(block, approxd_cols=np.full_like(block.approxd_cols, 99)),
        "approxd_rows": replace(block, approxd_rows=np.full_like(block.approxd_rows, -1)),
        "sample_u": replace(block, sample_u=np.full_like(block.sample_u, 1.5)),
        "lsh_planes": replace(block, lsh_planes=block.lsh_planes[:, :3]),
    }
    for engine in ("numpy", "numba"):
        hyper_attention(q, k, v, config=cfg, draws=good, engine=engine)
        for name, blk in bad.items():
            with pytest.raises(InputError, match=name):
                hyper_attention(q, k, v, config=cfg, draws=replace(good, blocks={"": blk}), engine=engine)
        with pytest.raises(InputError, match="blocks"):
            hyper_attention(q, k, v, config=cfg, draws=replace(good, blocks={}), engine=engine)


def test_hand_built_direct_draws_are_checked():
    from dataclasses import replace

    from hyperref.exact_set import heavykeys, sinks, window

    rng = np.random.default_rng(1)
    q, k, v = rng.standard_normal((3, 64, 8))
    cfg = HyperConfig(mode="direct", exact_set=sinks(2) | window(8) | heavykeys(4, 16), samples=4,
                      min_seq_len=8, query_block=16)
    good = _draws(cfg, causal=True)
    hyper_attention(q, k, v, causal=True, config=cfg, draws=good)
    d = good.direct
    for bad, match in ((replace(d, sample_u=np.full_like(d.sample_u, np.nan)), "sample_u"),
                       (replace(d, sample_u=d.sample_u[:2]), "sample_u"),
                       (replace(d, exact=d.exact[:2]), "exact-set entries"),
                       (replace(d, exact=(None, None, np.full_like(d.exact[2], 99))), "part 2")):
        with pytest.raises(InputError, match=match):
            hyper_attention(q, k, v, causal=True, config=cfg, draws=replace(good, direct=bad))
    with pytest.raises(InputError, match="direct"):
        hyper_attention(q, k, v, causal=True, config=cfg, draws=replace(good, direct=None))


def test_numba_engine_answers_where_its_kernels_do_not_apply():
    cfg = HyperConfig(block=16, samples=8, min_seq_len=8)
    rng = np.random.default_rng(2)
    q, k, v = (x.astype(np.longdouble) for x in rng.standard_normal((3, 64, 8)))
    np.testing.assert_allclose(hyper_attention(q, k, v, config=cfg, rng=0, engine="numba").astype(float),
                               hyper_attention(q, k, v, config=cfg, rng=0, engine="numpy").astype(float))
    empty = np.zeros((0, 2, 64, 8))
    assert hyper_attention(empty, empty, empty, config=cfg, rng=0, engine="numba").shape == (0, 2, 64, 8)


def test_gpu_path_on_the_cpu_refuses_what_it_cannot_compute(monkeypatch):
    torch = pytest.importorskip("torch")
    pytest.importorskip("triton")
    from hyperref import gpu

    q = torch.zeros(1, 1, 64, 16)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(InputError, match="bfloat16"):
        gpu.hyper_attention(q.bfloat16(), q.bfloat16(), q.bfloat16())
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(InputError, match="CUDA tensors"):
        gpu.hyper_attention(q, q, q)
    assert gpu.hyper_attention(q, q, q, backend="dense").shape == q.shape
