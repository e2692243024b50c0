"""Perplexity of SmolLM2-135M with HyperAttention variants on real texts (``REAL_LM.md``).

For every text and every variant, the model runs once with exact attention and
once with the variant in the chosen layers (:func:`hyperref.lm.evaluate`), at
n = 8192 tokens. Texts are named ``copy:FILE`` (the file's first n/2 tokens,
twice: the second half needs retrieval from n/2 back) or ``plain:FILE``.

    python benchmarks/real_lm.py --device cuda --text copy:a.py --text plain:b.py \\
        --variants baselines,detectors --json out.jsonl > table.md

Prints one markdown table per layer setting: ppl2 and mean attended keys per
query (exact + distinct sampled) per text, with the device, versions and date.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import platform
import sys

from hyperref import HyperConfig, lm
from hyperref.exact_set import blockkeys, blocktop, heavykeys, quest, sinks, sortlsh, topk, window


def direct(exact_set, samples=256, **kw) -> HyperConfig:
    return HyperConfig(mode="direct", exact_set=exact_set, samples=samples, min_seq_len=1024, **kw)


SW = sinks(4)


def variants() -> dict:
    """Named groups of ``(name, config)``."""
    return {
        "baselines": [
            ("sinks 4 + window 1024", direct(SW | window(1024), samples=0)),
            ("sinks 4 + window 512", direct(SW | window(512), samples=0)),
            ("sinks 4 + window 256 + 256 samples", direct(SW | window(256))),
            ("paper: sortlsh(7, 256, 1), 256 samples", direct(sortlsh(7, 256, 1))),
        ],
        "oracle": [
            ("sinks 4 + window 256 + topk 128 + 256 samples", direct(SW | window(256) | topk(128))),
            ("sinks 4 + window 256 + topk 32", direct(SW | window(256) | topk(32), samples=0)),
            ("sinks 4 + window 128 + topk 64 + 128 samples", direct(SW | window(128) | topk(64), samples=128)),
        ],
        "structured": [
            ("sinks 4 + window 764", direct(SW | window(764), samples=0)),
            ("sinks 4 + window 640", direct(SW | window(640), samples=0)),
            ("sinks 4 + window 256 + blocktop(64, 4)", direct(SW | window(256) | blocktop(64, 4), samples=0)),
            ("sinks 4 + window 256 + blocktop(64, 4) + heavykeys(64)",
             direct(SW | window(256) | blocktop(64, 4) | heavykeys(64, 256), samples=0)),
            ("sinks 4 + window 256 + blocktop(64, 4) + heavykeys(64) + 64 samples",
             direct(SW | window(256) | blocktop(64, 4) | heavykeys(64, 256), samples=64)),
            ("sinks 4 + window 256 + blocktop(64, 4) + heavykeys(64) + 128 samples",
             direct(SW | window(256) | blocktop(64, 4) | heavykeys(64, 256), samples=128)),
            ("same, 128 uniform samples",
             direct(SW | window(256) | blocktop(64, 4) | heavykeys(64, 256), samples=128, sampler="uniform")),
            ("sinks 4 + window 128 + blocktop(64, 6) + heavykeys(64) + 128 samples",
             direct(SW | window(128) | blocktop(64, 6) | heavykeys(64, 256), samples=128)),
            ("sinks 4 + window 256 + blocktop(32, 8) + heavykeys(64) + 128 samples",
             direct(SW | window(256) | blocktop(32, 8) | heavykeys(64, 256), samples=128)),
            ("sinks 4 + window 256 + blocktop(64, 3) + heavykeys(128) + 64 samples",
             direct(SW | window(256) | blocktop(64, 3) | heavykeys(128, 256), samples=64)),
            ("sinks 4 + window 256 + heavykeys(64) + sortlsh(7, 64, 2, centred) + 64 samples",
             direct(SW | window(256) | heavykeys(64, 256) | sortlsh(7, 64, 2, centred=True), samples=64)),
        ],
        "quest": [
            ("sinks 4 + window 512", direct(SW | window(512), samples=0)),
            ("sinks 4 + window 256 + quest(16, 1024, 128) + 128 samples",
             direct(SW | window(256) | quest(16, 1024, 128), samples=128)),
            ("sinks 4 + window 256 + heavykeys(64) + quest(16, 1024, 128) + 128 samples",
             direct(SW | window(256) | heavykeys(64, 256) | quest(16, 1024, 128), samples=128)),
            ("sinks 4 + window 256 + heavykeys(64) + quest(16, 1024, 128)",
             direct(SW | window(256) | heavykeys(64, 256) | quest(16, 1024, 128), samples=0)),
            ("sinks 4 + window 128 + heavykeys(64) + quest(16, 1024, 128) + 128 samples",
             direct(SW | window(128) | heavykeys(64, 256) | quest(16, 1024, 128), samples=128)),
            ("sinks 4 + window 256 + heavykeys(64) + quest(16, 512, 64) + 64 samples",
             direct(SW | window(256) | heavykeys(64, 256) | quest(16, 512, 64), samples=64)),
            ("sinks 4 + window 256 + heavykeys(64) + quest(16, 1024, 256) + 128 samples",
             direct(SW | window(256) | heavykeys(64, 256) | quest(16, 1024, 256), samples=128)),
            ("sinks 4 + window 256 + heavykeys(64) + quest(16, 256, 256) + 128 samples",
             direct(SW | window(256) | heavykeys(64, 256) | quest(16, 256, 256), samples=128)),
            ("sinks 4 + window 256 + heavykeys(64) + quest(32, 1024, 128) + 128 samples",
             direct(SW | window(256) | heavykeys(64, 256) | quest(32, 1024, 128), samples=128)),
        ],
        "final": [
            (f"sinks 4 + window 256 + heavykeys(64) + quest({b}, {c}, {k}) + 128 samples",
             direct(SW | window(256) | heavykeys(64, 256) | quest(b, c, k), samples=128))
            for b, c, k in [(8, 1024, 128), (8, 2048, 128), (16, 2048, 128), (8, 2048, 256)]
        ],
        "blockkeys": [
            (f"sinks 4 + window {w} + {'heavykeys(64) + ' if hk else ''}blockkeys(128, {keep}"
             f"{', ' + str(reps) if reps != 2 else ''}{', cand ' + str(cand) if cand != 2048 else ''})"
             f"{f' + {m} samples' if m else ''}",
             direct((SW | window(w) | heavykeys(64, 256) if hk else SW | window(w)) | blockkeys(128, keep, reps, cand),
                    samples=m))
            for w, hk, keep, reps, cand, m in [
                (256, False, 384, 2, 2048, 128), (256, False, 256, 2, 2048, 128), (256, False, 384, 2, 2048, 0),
                (256, False, 512, 2, 2048, 0), (256, True, 320, 2, 2048, 128), (128, False, 512, 2, 2048, 128),
                (256, False, 384, 4, 2048, 128), (256, False, 384, 2, 4096, 128)]
        ],
        "layers": [
            ("sinks 4 + window 640", direct(SW | window(640), samples=0)),
            ("sinks 4 + window 256 + heavykeys(64) + quest(16, 1024, 256) + 128 samples",
             direct(SW | window(256) | heavykeys(64, 256) | quest(16, 1024, 256), samples=128)),
        ],
        "detectors": [
            (f"sinks 4 + window 256 + sortlsh({bits}, {block}, {rounds}{', centred' if c else ''}) + {m} samples",
             direct(SW | window(256) | sortlsh(bits, block, rounds, centred=c), samples=m))
            for bits, block, rounds, c, m in [
                (7, 64, 1, False, 128), (7, 64, 4, False, 128), (7, 64, 4, True, 128),
                (7, 32, 8, True, 128), (10, 32, 8, True, 128), (4, 64, 4, True, 128),
                (7, 128, 2, True, 128), (7, 64, 4, True, 256), (7, 64, 4, True, 0)]
        ],
    }


def versions(device: str) -> str:
    import torch
    import transformers

    name = torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "CPU"
    return (f"{name}; torch {torch.__version__}, transformers {transformers.__version__}, "
            f"Python {platform.python_version()}; {datetime.date.today().isoformat()}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--text", action="append", required=True, help="copy:FILE or plain:FILE")
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--variants", default="baselines,oracle,detectors")
    ap.add_argument("--layers", default="all", help="comma list of layer settings, e.g. all,last:15,last:5")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="append one JSON object per run to this file")
    args = ap.parse_args(argv)
    groups = variants()
    chosen = [v for g in args.variants.split(",") for v in groups[g]]
    texts = []
    for spec in args.text:
        kind, _, path = spec.partition(":")
        if kind not in ("copy", "plain"):
            ap.error(f"--text must be copy:FILE or plain:FILE, got {spec!r}")
        texts.append((f"{kind} {pathlib.Path(path).name}", kind == "copy",
                      pathlib.Path(path).read_text(encoding="utf-8")))
    model, tok = lm.load_model(args.device)
    say = lambda line: print(f"[real_lm] {line}", file=sys.stderr, flush=True)  # noqa: E731
    sink = open(args.json, "a") if args.json else None
    print(f"SmolLM2-135M-Instruct (Q4_1 GGUF, float32), n = {args.n}; {versions(args.device)}\n")
    for layers in args.layers.split(","):
        rows, exact_row = [], None
        for name, cfg in chosen:
            cells = []
            for tname, copy, text in texts:
                say(f"{layers} | {name} | {tname}")
                r = lm.evaluate(cfg, text=text, n=args.n, copy=copy, layers=layers, device=args.device,
                                seed=args.seed, model=model, tokenizer=tok)
                if sink:
                    sink.write(json.dumps({"variant": name, "text": tname, **r}) + "\n")
                    sink.flush()
                cells.append(r)
            exact_row = exact_row or cells
            rows.append((name, cells))
        head = " | ".join(f"{t[0]} ppl2 | keys" for t in texts)
        print(f"### layers: {layers}\n\n| attention | {head} |")
        print("| --- |" + " ---: | ---: |" * len(texts))
        print("| exact | " + " | ".join(f"{c['exact']['ppl2']:.3f} | {c['exact']['keys_per_query']:.0f}"
                                       for c in exact_row) + " |")
        for name, cells in rows:
            print(f"| {name} | " + " | ".join(f"{c['hyper']['ppl2']:.3f} | {c['hyper']['keys_per_query']:.0f}"
                                              for c in cells) + " |")
        print()
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
