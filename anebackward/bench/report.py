"""Terminal table, progress bar and the optional bar chart."""
import sys
import time

ORDER = ("reference", "numpy", "torch", "composed", "sgemm")


def fmt_t(s):
    if s is None:
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.1f}µs"
    if s < 1.0:
        return f"{s * 1e3:.2f}ms"
    return f"{s:.2f}s"


def progress(i, n, what, t0):
    width = 30
    done = int(width * i / max(n, 1))
    el = time.perf_counter() - t0
    sys.stderr.write(f"\r[{'#' * done}{'.' * (width - done)}] {i}/{n} {el:6.1f}s  {what[:48]:<48}")
    sys.stderr.flush()


def _cell(r, sgemm=False):
    if r is None:
        return "-"
    if r["status"] != "ok":
        return "skipped" if r["status"] == "skipped" else "n/a"
    if r["ratio_to_ours"] is None:
        return fmt_t(r["median_s"])
    if sgemm:
        return f"{100 * r['ratio_to_ours']:.0f}% ({fmt_t(r['median_s'])})"
    return f"×{r['ratio_to_ours']:.2f} ({fmt_t(r['median_s'])})"


def table(records, env):
    """Rows: one per kernel case. ours: median [min–max]; other columns:
    ×(contender/ours) with the contender's median; sgemm: % of the raw sgemm."""
    cases, order = {}, []
    for r in records:
        key = (r["name"], r["shape"], r["site"])
        if key not in cases:
            cases[key] = {}
            order.append(key)
        cases[key][r["contender"]] = r
    cols = [c for c in ORDER if any(c in v for v in cases.values())]
    head = f"{'kernel':<24}{'shape':<18}{'ours median [min-max]':<30}{'GFLOP/s':>8}  " + \
        "".join(f"{('vs ' + c) if c != 'sgemm' else '% of sgemm':<22}" for c in cols)
    lines = ["", "Speed-up of ours: ×N = contender time / ours (N > 1: ours faster); "
             "% of sgemm = raw sgemm time / ours.",
             "Each figure: median of the timed repeats after warm-up; contenders interleaved.", "",
             head, "-" * len(head)]
    notes = {}
    overhead = []
    for key in order:
        row = cases[key]
        name, shape, site = key
        o = row.get("ours")
        if name == "call_overhead":
            overhead = [f"  {c:<10} {r['median_s'] * 1e6:8.2f} µs/call" for c, r in row.items()
                        if r["status"] == "ok"]
            continue
        label = shape + (f"/{site}" if site else "")
        if o is not None and o["status"] == "ok":
            ot = f"{fmt_t(o['median_s'])} [{fmt_t(o['min_s'])}-{fmt_t(o['max_s'])}]"
            gf = f"{o['gflops']:.1f}" if o["gflops"] else ""
        else:
            ot = "n/a" if o is None else o["status"]
            gf = ""
        line = f"{name:<24}{label:<18}{ot:<30}{gf:>8}  "
        for c in cols:
            line += f"{_cell(row.get(c), c == 'sgemm'):<22}"
        lines.append(line)
        for c, r in row.items():
            if r["note"]:
                notes.setdefault((c, r["note"]), []).append(f"{name} {label}")
    steps = [(k, cases[k]) for k in order if k[0] == "full_step"]
    if steps:
        lines += ["", "Full training step (forward, backward, clip, AdamW), time per step and "
                  "ratios (row / column):"]
        for (name, shape, site), row in steps:
            ok = {c: r["median_s"] for c, r in row.items() if r["status"] == "ok"}
            lines.append(f"  {shape}: " + ", ".join(f"{c} {fmt_t(t)}" for c, t in ok.items()))
            for base in ("ours",) if "ours" in ok else ("composed",):
                if base in ok:
                    lines.append(f"    {base} is faster than: " + ", ".join(
                        f"{c} ×{t / ok[base]:.2f}" for c, t in ok.items() if c != base))
    if overhead:
        lines += ["", "Python call overhead (swiglu on 8 floats, out= preallocated):"] + overhead
    if notes:
        lines += ["", "Notes:"]
        for (c, note), where in notes.items():
            w = ", ".join(where[:4]) + (f" (+{len(where) - 4} more)" if len(where) > 4 else "")
            lines.append(f"  {c}: {note} [{w}]")
    lines.append(f"\nwall time {env.get('wall_time_s')} s")
    return lines


def plot(path, records):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "--plot: matplotlib is not installed (pip install matplotlib); no chart written"
    rows = [r for r in records if r["ratio_to_ours"] and r["contender"] != "ours"
            and r["name"] != "call_overhead"]
    if not rows:
        return "--plot: no speed-ups to plot"
    labels = []
    for r in rows:
        lab = f"{r['name']} {r['shape']}" + (f"/{r['site']}" if r["site"] else "")
        if lab not in labels:
            labels.append(lab)
    conts = [c for c in ORDER if any(r["contender"] == c for r in rows)]
    fig, ax = plt.subplots(figsize=(max(8, 0.45 * len(labels) * max(1, len(conts)) / 2), 6))
    w = 0.8 / len(conts)
    for j, c in enumerate(conts):
        xs, ys = [], []
        for r in rows:
            if r["contender"] == c:
                lab = f"{r['name']} {r['shape']}" + (f"/{r['site']}" if r["site"] else "")
                xs.append(labels.index(lab) + j * w)
                ys.append(r["ratio_to_ours"])
        ax.bar(xs, ys, width=w, label=c if c != "sgemm" else "sgemm (fraction of peak)")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_yscale("log")
    ax.set_ylabel("contender time / ours (log; > 1 = ours faster)")
    ax.set_xticks([i + 0.4 - w / 2 for i in range(len(labels))])
    ax.set_xticklabels(labels, rotation=75, ha="right", fontsize=7)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"wrote {path}"
