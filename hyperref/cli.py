"""The ``hyperref`` command: HyperAttention next to exact attention on one input.

``hyperref`` alone is ``hyperref run`` with the defaults: a seeded planted
workload (n = 16384, d = 64, float32), see :func:`hyperref.workloads.planted_workload`.
Bad input gives a one-line error on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence

import numpy as np

from ._validation import InputError, check_qkv
from .attention import ENGINES, default_engine, exact_attention, heavy_mask, hyper_attention
from .config import ESTIMATORS, NORMALIZERS, SAMPLERS, HyperConfig
from .draws import make_draws
from .workloads import planted_workload

EXIT_USAGE = 2
#: failure probability at which the bounds are reported
DELTA = 0.1


class UsageError(Exception):
    """A one-line error for the user (exit code 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, no usage dump
        raise UsageError(message)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _seed(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"a seed is an integer >= 0, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="hyperref", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"hyperref {__version__}")
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser("run", help="run HyperAttention and exact attention and compare")
    run.error = parser.error
    run.add_argument("--input", metavar="FILE.npz",
                     help="arrays q, k, v of shape (N, D) or (B, H, N, D)")
    run.add_argument("--n", type=_positive_int, default=16384, help="length of the default workload")
    run.add_argument("--d", type=_positive_int, default=64, help="head dim of the default workload")
    run.add_argument("--seed", type=_seed, default=0, help="seed of the workload and the draws (>= 0)")
    run.add_argument("--causal", action="store_true", help="bottom-right aligned causal mask")
    defaults = HyperConfig()
    run.add_argument("--block", type=_positive_int, default=defaults.block)
    run.add_argument("--samples", type=_positive_int, default=defaults.samples)
    run.add_argument("--bits", type=_positive_int, default=defaults.bits)
    run.add_argument("--min-seq-len", type=_positive_int, default=defaults.min_seq_len)
    run.add_argument("--estimator", choices=ESTIMATORS, default=defaults.estimator)
    run.add_argument("--sampler", choices=SAMPLERS, default=defaults.sampler)
    run.add_argument("--normalizer", choices=NORMALIZERS, default=defaults.normalizer)
    run.add_argument("--engine", choices=ENGINES, default=default_engine(),
                     help="numba kernels (default when installed) or the NumPy reference")
    run.add_argument("--save", metavar="OUT.npz", help="write out and lse to an .npz file")
    run.add_argument("--repeats", type=_positive_int, default=3,
                     help="timed calls of each attention (the median is reported)")
    run.add_argument("--no-theory", action="store_true",
                     help="skip the exact parameters and bounds of SPEC §2/§7 (O(n²) work)")
    run.add_argument("--json", action="store_true", help="print one JSON object")
    _add_lm_parser(sub, parser)
    return parser


def _add_lm_parser(sub, parser) -> None:
    from .presets import causal_lm

    best = causal_lm()
    lm = sub.add_parser("lm", help="perplexity of a pretrained LM (SmolLM2-135M) with exact and "
                        "HyperAttention")
    lm.error = parser.error
    lm.add_argument("--text", metavar="FILE", help="a UTF-8 text (default: Python's own sources)")
    lm.add_argument("--n", type=_positive_int, default=8192, help="tokens (even, <= 8192)")
    lm.add_argument("--copy", action="store_true", help="the text's first n/2 tokens, twice")
    lm.add_argument("--layers", default="all", help="all, last:K, first:K or a list such as 0,5,9")
    lm.add_argument("--exact-set", default=best.exact_set.describe(),
                    help="the exactly computed keys, e.g. 'sinks(4) | window(256) | sortlsh(7, 64, 4)'")
    lm.add_argument("--samples", type=_int, default=best.samples, help="sampled keys per query block")
    lm.add_argument("--sampler", choices=SAMPLERS, default=best.sampler)
    lm.add_argument("--query-block", type=_positive_int, default=best.query_block)
    lm.add_argument("--min-seq-len", type=_positive_int, default=best.min_seq_len)
    lm.add_argument("--seed", type=_seed, default=0, help="seed of the draws (>= 0)")
    lm.add_argument("--device", default="cpu", help="cpu (the Numba engine) or cuda (the block-sparse engine where it computes the exact set, else the torch twin)")
    lm.add_argument("--json", action="store_true", help="print one JSON object")


def _load_input(path: str):
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise UsageError(f"cannot read {path}: {exc or 'empty file'}") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise UsageError(f"{path}: expected an .npz archive with arrays q, k, v, got a single array")
    try:
        with data:
            missing = [name for name in ("q", "k", "v") if name not in data.files]
            if missing:
                raise UsageError(f"{path}: missing array(s) {', '.join(missing)} (need q, k, v)")
            return data["q"], data["k"], data["v"]
    except UsageError:
        raise
    except (OSError, ValueError, EOFError, KeyError) as exc:
        raise UsageError(f"cannot read {path}: {exc}") from None


def _timed(fn, repeats: int = 1):
    """``(result, median seconds)`` over ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return result, float(np.median(times))


def _progress(line: str) -> None:
    print(f"[hyperref run] {line}", file=sys.stderr, flush=True)


def _finite_or_none(obj):
    """``obj`` with every non-finite float replaced by ``None`` (strict JSON has no Infinity/NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {key: _finite_or_none(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(value) for value in obj]
    return obj


def evaluate(q, k, v, *, causal: bool, config: HyperConfig, seed: int,
             engine: str | None = None, repeats: int = 1, theory: bool = True,
             progress=None) -> tuple[dict, tuple]:
    """Run both attentions and measure the error and the parameters.

    Returns the report dict and ``(out, lse)`` of HyperAttention. For batched
    input each parameter and error is the maximum over (batch, head). Times
    are medians over ``repeats`` calls; ``theory=False`` skips the exact
    parameters and bounds (then ``error_op`` and the parameters are ``None``).
    """
    say = progress or (lambda line: None)
    from hyperref.theory.bounds import g2_bound, g3_bound, g4_bound, product_bound
    from hyperref.theory.parameters import attention_parameters, spectral_error

    from .sampling import sampling_probabilities

    q, k, v, single = check_qkv(q, k, v)
    b, h, nq, d = q.shape
    nk = k.shape[2]
    draws = make_draws(config, nq, nk, d, causal=causal,
                       batch_shape=() if single else (b, h), rng=seed)
    unb = (lambda x: x[0, 0]) if single else (lambda x: x)
    def call():
        return hyper_attention(unb(q), unb(k), unb(v), causal=causal, config=config, draws=draws,
                               return_lse=True, engine=engine)

    say("warm-up call (the Numba kernels load, or compile on first use)")
    call()
    say(f"timing HyperAttention and exact attention (median of {repeats})")
    (out, lse), t_hyper = _timed(call, repeats)
    (exact, exact_lse), t_exact = _timed(lambda: exact_attention(
        unb(q), unb(k), unb(v), causal=causal, return_lse=True), repeats)
    if theory:
        say("exact parameters and bounds (SPEC §2, §7; O(n²) work, --no-theory skips them)")
    out4 = out[None, None] if single else out
    exact4 = exact[None, None] if single else exact
    lse4 = lse[None, None] if single else lse
    exact_lse4 = exact_lse[None, None] if single else exact_lse
    fallback = nq <= config.min_seq_len
    bound_keys = ("eta", "g1", "g2_srank", "g3_srank", "product", "g4")
    worst_bounds = {key: 0.0 for key in bound_keys}
    held = True
    keys = ("alpha", "kappa", "srank_p", "srank_v", "op_p", "op_v", "heavy_mass_mean",
            "max_abs_logit", "error_op", "error_fro")
    worst = {key: -math.inf for key in keys}
    group = h // k.shape[1]
    for bi in range(b if theory else 0):
        for hi in range(h):
            qh, kh, vh = q[bi, hi], k[bi, hi // group], v[bi, hi // group]
            mask = heavy_mask(qh, kh, causal=causal, config=config,
                              draws=draws if single else draws.head((bi, hi)))
            par = attention_parameters(qh, kh, vh, causal=causal, mask=mask, residual_norm=False)
            e = exact4[bi, hi].astype(np.float64)
            diff = out4[bi, hi].astype(np.float64) - e
            fro = float(np.linalg.norm(e))
            row = dict(par.as_dict(),
                       error_op=spectral_error(out4[bi, hi], e, par.op_p, par.op_v),
                       error_fro=float(np.linalg.norm(diff)) / fro if fro > 0 else 0.0)
            for key in keys:
                value = row[key]
                if not (isinstance(value, float) and math.isnan(value)):
                    worst[key] = max(worst[key], value)
            if causal or fallback:
                continue
            seen = np.isfinite(exact_lse4[bi, hi])
            eta = float(np.abs(np.expm1(exact_lse4[bi, hi][seen].astype(np.float64)
                                        - lse4[bi, hi][seen].astype(np.float64))).max())
            col = par.col_sq_res if config.estimator == "masked" else par.col_sq
            prod = product_bound(config.samples, DELTA, col, vh,
                                 sampling_probabilities(vh, config.sampler), par.op_p, par.op_v)
            head_bounds = {
                "eta": eta, "g1": eta,
                "g2_srank": g2_bound(config.samples, DELTA, par.srank_p, par.srank_v),
                "g3_srank": g3_bound(config.samples, DELTA, par.fro_res, par.op_p, par.srank_v),
                "product": prod, "g4": g4_bound(prod, eta),
            }
            for key in bound_keys:
                worst_bounds[key] = max(worst_bounds[key], head_bounds[key])
            held = held and row["error_op"] <= head_bounds["g4"]
    report = {
        "n": nq, "nk": nk, "d": d, "dv": v.shape[3],
        "batch_shape": [] if single else [b, h],
        "dtype": str(q.dtype), "causal": causal, "seed": seed,
        "config": config.as_dict(),
        "engine": engine or default_engine(),
        "exact_fallback": nq <= config.min_seq_len,
    }
    for key in keys:
        report[key] = worst[key] if math.isfinite(worst[key]) else None
    if not theory:
        diff = out4.astype(np.float64) - exact4.astype(np.float64)
        norms = np.linalg.norm(exact4.astype(np.float64), axis=(2, 3))
        rel = np.linalg.norm(diff, axis=(2, 3)) / np.where(norms > 0, norms, 1.0)
        report["error_fro"] = float(np.where((norms == 0) & (rel > 0), math.inf, rel).max())
        report["bounds"] = None
        report["guarantee_held"] = None
        report["bounds_note"] = "not computed (--no-theory)"
    elif causal:
        report["bounds"] = None
        report["guarantee_held"] = None
        report["bounds_note"] = "no bound is derived for the causal recursion (SPEC §7 covers the non-causal estimator)"
    elif fallback:
        report["bounds"] = {"delta": DELTA, "exact": True}
        report["guarantee_held"] = True
    else:
        report["bounds"] = dict(worst_bounds, delta=DELTA, estimator=config.estimator,
                                sampler=config.sampler, normalizer=config.normalizer)
        report["guarantee_held"] = held
    report["time_hyper_s"] = t_hyper
    report["time_exact_s"] = t_exact
    report["speedup"] = t_exact / t_hyper if t_hyper > 0 else None
    return report, (out, lse)


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _format_table(report: dict) -> str:
    rows = [
        ("n (queries) / nk (keys)", f"{report['n']} / {report['nk']}"),
        ("d / dv", f"{report['d']} / {report['dv']}"),
        ("batch (B, H)", str(tuple(report["batch_shape"])) if report["batch_shape"] else "single head"),
        ("dtype", report["dtype"]),
        ("engine", report["engine"]),
        ("causal", str(report["causal"])),
        ("config", ", ".join(f"{k}={v}" for k, v in report["config"].items())),
        ("exact fallback (n <= min_seq_len)", str(report["exact_fallback"])),
        ("alpha (column-norm parameter)", _fmt(report["alpha"], ".4g")),
        ("kappa (row ratio, unmasked)", "n/a" if report["kappa"] is None else _fmt(report["kappa"], ".4g")),
        ("srank(P)", _fmt(report["srank_p"], ".4g")),
        ("srank(V)", _fmt(report["srank_v"], ".4g")),
        ("heavy mass captured (mean)", _fmt(report["heavy_mass_mean"], ".4f")),
        ("max |logit|", _fmt(report["max_abs_logit"], ".4g")),
        ("error_op  ‖Ã−A‖op/(‖P‖op‖V‖op)", _fmt(report["error_op"], ".4e")),
        ("error_fro ‖Ã−A‖F/‖A‖F", _fmt(report["error_fro"], ".4e")),
        ("bound G4 (δ = 0.1)", "n/a" if not report["bounds"] or "g4" not in report["bounds"]
         else f"{report['bounds']['g4']:.4e}  (η = {report['bounds']['eta']:.3e}, product {report['bounds']['product']:.3e})"),
        ("guarantee held", str(report["guarantee_held"])),
        ("time HyperAttention (s)", _fmt(report["time_hyper_s"], ".3f")),
        ("time exact (s)", _fmt(report["time_exact_s"], ".3f")),
        ("speedup", f"{report['speedup']:.1f}x" if report["speedup"] else "n/a"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def run(args) -> int:
    if args.input is not None:
        q, k, v = _load_input(args.input)
    else:
        q, k, v = planted_workload(args.n, args.d, rng=args.seed)
    try:
        config = HyperConfig(bits=args.bits, block=args.block, samples=args.samples,
                             min_seq_len=args.min_seq_len, estimator=args.estimator,
                             sampler=args.sampler, normalizer=args.normalizer)
    except (TypeError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    report, (out, lse) = evaluate(q, k, v, causal=args.causal, config=config, seed=args.seed,
                                  engine=args.engine, repeats=args.repeats,
                                  theory=not args.no_theory, progress=_progress)
    if args.save:
        path = args.save if args.save.endswith(".npz") else args.save + ".npz"  # what np.savez writes
        try:
            np.savez(path, out=out, lse=lse)
        except OSError as exc:
            raise UsageError(f"cannot write {path}: {exc}") from None
        report["saved"] = path
    if args.json:
        print(json.dumps(_finite_or_none(report), indent=2, allow_nan=False))
    else:
        print(_format_table(report))
    return 0


def _format_lm(report: dict) -> str:
    lines = [f"n = {report['n']}{' (copy)' if report['copy'] else ''}, layers {report['layers']}, "
             f"exact set {report['config']['exact_set']}, samples {report['config']['samples']}",
             "", "| attention | ppl | ppl1 | ppl2 | keys per query | seconds |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name in ("exact", "hyper"):
        r = report[name]
        keys = "n/a" if r["keys_per_query"] is None else f"{r['keys_per_query']:.0f}"
        lines.append(f"| {name} | {r['ppl']:.3f} | {r['ppl1']:.3f} | {r['ppl2']:.3f} | {keys} | "
                     f"{r['seconds']:.1f} |")
    return "\n".join(lines)


def lm(args) -> int:
    from . import lm as lm_
    from .exact_set import parse_exact_set

    try:
        config = HyperConfig(mode="direct", exact_set=parse_exact_set(args.exact_set),
                             samples=args.samples, sampler=args.sampler,
                             query_block=args.query_block, min_seq_len=args.min_seq_len)
    except (TypeError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    text = None
    if args.text is not None:
        try:
            with open(args.text, encoding="utf-8") as fh:
                text = fh.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read {args.text}: {exc}") from None
    if args.device not in ("cpu", "cuda") and not args.device.startswith("cuda:"):
        raise UsageError(f"device must be cpu or cuda, got {args.device!r}")
    try:
        report = lm_.evaluate(config, text=text, n=args.n, copy=args.copy, layers=args.layers,
                              device=args.device, seed=args.seed, progress=lm_.main_progress)
    except lm_.MissingDependency as exc:
        raise UsageError(str(exc)) from None
    print(json.dumps(_finite_or_none(report), indent=2, allow_nan=False) if args.json else _format_lm(report))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version"):
        argv = ["run"] + argv
    try:
        args = build_parser().parse_args(argv)
        commands = {"run": run, "lm": lm}
        if args.command not in commands:
            raise UsageError("unknown command; use 'hyperref run' or 'hyperref lm' (see 'hyperref --help')")
        return commands[args.command](args)
    except (UsageError, InputError) as exc:
        # one line: control characters of the user's arguments (a form feed, a newline) escaped
        message = "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(exc))
        print(f"hyperref: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except MemoryError as exc:  # e.g. --n 10**12: the workload itself does not fit
        print(f"hyperref: error: not enough memory ({exc}); use a smaller --n, --d or input",
              file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
