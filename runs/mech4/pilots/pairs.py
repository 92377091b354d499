"""Paired figures (dapo vs sym_clip / seq_mean) of the pilot records, per config and seed."""
import json, sys, glob, os
keys = ["entropy_all", "entropy_lastq", "clip_frac_high", "length_mean_first10", "length_mean_all", "length_mean_lastq", "truncated_all", "accuracy_evals_mean"]
for path in sorted(glob.glob("runs/mech4/pilots/*.jsonl")):
    rows = [json.loads(l) for l in open(path) if l.strip()]
    for seed in sorted({r["seed"] for r in rows}):
        by = {r["setting"]: r for r in rows if r["seed"] == seed}
        d = by.get("dapo")
        if not d:
            continue
        for other, sign in (("sym_clip", 1), ("seq_mean", -1)):
            o = by.get(other)
            if not o:
                continue
            diffs = " ".join(f"{k}={sign*(d[k]-o[k]):+.4f}" for k in keys if d.get(k) is not None and o.get(k) is not None)
            lbl = "dapo-sym" if other == "sym_clip" else "seq-dapo"
            print(f"{os.path.basename(path)[:-6]:12s} seed {seed} {lbl}: {diffs}")
