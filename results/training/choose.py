"""Pick LongMamba's settings and DeciMamba's layer from validation runs (sweep2.sh): the highest mean accuracy
at 16 × L_train over the validation haystacks (LongMamba), over 2-16 × L_train (DeciMamba); ties go to the
defaults. Prints the eval.py flags of the choice on the first line, the scores after it."""
import glob
import json
import os
import sys

scores = {}
for path in sorted(glob.glob(os.path.join(sys.argv[1], "*", "passkey_*.json"))):
    r = json.load(open(path))
    s = r["settings"]
    if r["method"] == "longmamba":
        key = ("longmamba", f"--c {s['c']} --b {s['b']} --variant {s['variant']} --sc {s['sc']} "
                            f"--decay-state {s['decay_state']}")
        cells = [r["accuracy"][str(16 * r["L_train"])]]
    else:
        key = ("decimamba", f"--decimating-layers {','.join(map(str, s['layers']))}")
        cells = list(r["accuracy"].values())
    scores.setdefault(key, []).extend(sum(c.values()) / len(c) for c in cells)
mean = {k: sum(v) / len(v) for k, v in scores.items()}
default = {"longmamba": "--c 0.05 --b 1.0 --variant dt_thre --sc 0.0 --decay-state slowest"}
best = {m: max((k for k in mean if k[0] == m), key=lambda k: (round(mean[k], 3), k[1] == default.get(m)))
        for m in ("longmamba", "decimamba")}
print(f"--method vanilla,longmamba,decimamba {best['longmamba'][1]} {best['decimamba'][1]}")
for k in sorted(mean, key=lambda k: -mean[k]):
    print(f"{mean[k]:.3f}  {k[0]} {k[1]}")
