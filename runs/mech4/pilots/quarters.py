"""Per-quarter figures of a run's metrics.jsonl or of each record of a results jsonl (issue 21 pilots, 2026-12-02)."""
import json, sys

def mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else float("nan")

def show(path, label, parts=4, rows=None):
    rows = rows if rows is not None else [json.loads(l) for l in open(path) if l.strip()]
    ev = [(r["step"], round(r["eval/avg@k"], 3)) for r in rows if r.get("eval/avg@k") is not None]
    tr = [r for r in rows if r.get("actor/entropy") is not None or r.get("response/length_mean") is not None]
    tr = [r for r in tr if r["step"] >= 1]
    print(label)
    print("  evals", ev)
    n = len(tr)
    if not n:
        return
    for q in range(parts):
        seg = tr[q * n // parts:(q + 1) * n // parts]
        if not seg:
            continue
        g = lambda k: mean([r.get(k) for r in seg])
        print(f"  steps {seg[0]['step']}-{seg[-1]['step']}: ent {g('actor/entropy'):.3f} len {g('response/length_mean'):.1f} "
              f"max {g('response/length_max'):.1f} trunc {100*g('response/truncated_frac'):.1f}% "
              f"cliphi {100*g('actor/clip_frac_high'):.3f}% cliplo {100*g('actor/clip_frac_low'):.3f}% "
              f"acc {g('train/accuracy'):.3f} gen/kept {g('dynamic_sampling/generated'):.1f}/{g('dynamic_sampling/kept'):.1f}")

for p in sys.argv[1:]:
    lines = [json.loads(l) for l in open(p) if l.strip()]
    if lines and "curve" in lines[0]:  # a bench/mechanisms.py results jsonl: one record per run
        for rec in lines:
            show(p, f"{p}: {rec['setting']} seed {rec['seed']}", rows=rec["curve"])
    else:  # a run's metrics.jsonl
        show(p, p, rows=lines)
