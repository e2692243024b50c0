import json, collections
R = json.load(open("all_results.json"))
for r in R:
    if r["kind"] == "sinks(2) | 3": r["cls"] = "clear error"
c = collections.Counter(r["cls"] for r in R)
out = ["# hyperref bad-input catalog", "",
"## 1. The rule", "",
"**Every public call gives a correct answer or an `InputError`, never a wrong number, never an unclear crash.**", "",
"Classes used below: *clear error* (exception whose message names the problem; type noted, `InputError` is the package's), "
"*correct* (checked against a float64 NumPy oracle written in `harness.py` in exact limits — `min_seq_len >= n` — or, for sampled modes with the `self` normalizer, "
"the invariant 'finite and inside the convex hull of the rows of v'), *WRONG* (silently wrong number: here, inf/NaN where the true answer is finite, or an out-of-range index silently read), "
"*UNCLEAR* (crash whose type/message does not name the problem), plus two extra labels: *handled* (returned without error, no oracle applies: e.g. ApproxD/`paper` estimator, "
"valid constructors, theory bounds), *accepted-invalid* (an invalid input — mainly hand-built draws — accepted without refusal; output only invariant-checked), "
"*inconclusive* (one case, see table).", "",
"Probes: `probes_core.py`, `probes_approx.py`, `probes_misc.py`, `probes_gpu_theory.py` (TRITON_INTERPRET=1, CPU), `probes_cli.sh`; raw records in `all_results.json` "
"(one record per call, with message / note). All probes n <= 64 rows, OMP_NUM_THREADS=1.", "",
"## 2. Per function", ""]
by = collections.OrderedDict()
for r in R: by.setdefault(r["fn"], []).append(r)
for fn, rs in by.items():
    out += [f"### {fn}", "", "| input kind | outcome | detail |", "|---|---|---|"]
    for r in rs:
        det = (f"{r.get('exc','')}: {r.get('msg','')}" if "exc" in r else r.get("note", "")).replace("|", "\\|").replace("\n", " ")[:140]
        out.append(f"| {r['kind'].replace('|', '/')} | {r['cls']} | {det} |")
    out.append("")
open("tables.md", "w").write("\n".join(out))
bad = [r for r in R if r["cls"] in ("WRONG", "UNCLEAR")]
json.dump(bad, open("bad_cases.json", "w"), indent=1)
print(len(R), dict(c))
