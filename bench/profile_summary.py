#!/usr/bin/env python3
"""Summarizes an `ncu --csv --metrics gpu__time_duration.sum` log of `gpu_bench --profile`:
per profiled run (one series at one batch size), the kernels of its last decode step (or, with
`first` as the fourth argument, of its first step: the prefill; a step starts at the `embed`
kernel), grouped by name: count, total and share of the step's time."""
import csv
import sys

rows = [r for r in csv.reader(l for l in open(sys.argv[1]) if l.startswith('"'))]
hdr, rows = rows[0], rows[1:]
ni, vi = hdr.index("Kernel Name"), hdr.index("Metric Value")
kernels = [(r[ni].split("(")[0], float(r[vi].replace(",", ""))) for r in rows]
# Kernels in launch order; every step starts with `embed`, and each profiled run is `per_run`
# steps (gpu.sh runs gpu_bench with --num-tokens 3: prefill and two decode steps).
steps, cur = [], []
for name, ns in kernels:
    if name == "embed" and cur:
        steps.append(cur)
        cur = []
    cur.append((name, ns))
steps.append(cur)
labels = sys.argv[2].split(",") if len(sys.argv) > 2 else []
per_run = int(sys.argv[3]) if len(sys.argv) > 3 else 3  # steps per profiled run
first = len(sys.argv) > 4 and sys.argv[4] == "first"
for r in range(len(steps) // per_run):
    step = steps[r * per_run] if first else steps[(r + 1) * per_run - 1]
    total = sum(ns for _, ns in step)
    label = labels[r] if r < len(labels) else f"run {r}"
    print(f"== {label}: {'prefill' if first else 'last decode'} step, {len(step)} kernels, {total / 1e3:.1f} us of kernel time")
    agg = {}
    for name, ns in step:
        c, t = agg.get(name, (0, 0.0))
        agg[name] = (c + 1, t + ns)
    for name, (c, t) in sorted(agg.items(), key=lambda kv: -kv[1][1]):
        print(f"  {name[:60]:60s} {c:5d} x {t / c / 1e3:8.2f} us = {t / 1e3:9.1f} us ({100 * t / total:4.1f}%)")
