"""Terminal table, progress bar and the optional bar chart."""
import sys
import textwrap
import time

ORDER = ("reference", "numpy", "torch", "composed", "sgemm")


def precision_of(contender):
    """The precision a contender computes in: "bf16" for the *-bf16 ones
    (the full step only), else "fp32"."""
    return "bf16" if contender.endswith("-bf16") else "fp32"


def _bare(contender):
    """A contender's name without its precision suffix."""
    return contender[:-len("-bf16")] if contender.endswith("-bf16") else contender


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
    """A contender's column: ×(its time / ours), or for sgemm the % of its rate
    that ours reaches; the contender's own times are in the JSON."""
    if r is None:
        return "-"
    if r["status"] != "ok":
        return "skipped" if r["status"] == "skipped" else "n/a"
    if r["ratio_to_ours"] is None:
        return fmt_t(r["median_s"])
    if sgemm:
        return f"{100 * r['ratio_to_ours']:.0f}%"
    x = r["ratio_to_ours"]
    return f"×{x:.2f}" if x < 100 else f"×{x:.0f}"


CASE_W, OURS_W, SPREAD_W, GF_W, COL_W = 23, 10, 7, 7, 10


def table(records, env):
    """One block per shape, one row per kernel (and matmul site): ours'
    median, its spread (max − min over the median), GFLOP/s, and per
    contender ×(contender/ours) — or, for sgemm, the % of the raw sgemm's
    rate. At most 100 columns with every contender."""
    cases, order = {}, []
    for r in records:
        key = (r["name"], r["shape"], r["site"])
        if key not in cases:
            cases[key] = {}
            order.append(key)
        cases[key][r["contender"]] = r
    cols = [c for c in ORDER if any(c in v for v in cases.values())]
    head = f"{'kernel':<{CASE_W}}{'ours median':>{OURS_W + 1}}{'spread':>{SPREAD_W}}" \
        f"{'GFLOP/s':>{GF_W}}  " + "".join(f"{('sgemm%' if c == 'sgemm' else c)[:COL_W - 1]:>{COL_W}}"
                                          for c in cols)
    lines = ["", "×N = contender time / ours (N > 1: ours faster); sgemm% = share of a raw sgemm's "
             "rate ours reaches;",
             "medians of the timed repeats after warm-up, contenders interleaved; spread = (max - min) "
             "/ median;", "every contender's own times are in --json.", "",
             head.rstrip(), "-" * len(head.rstrip())]
    notes = {}
    overhead = []
    shape_now = None
    for key in order:
        row = cases[key]
        name, shape, site = key
        o = row.get("ours")
        if name == "call_overhead":
            overhead = [f"  {c:<10} {r['median_s'] * 1e6:8.2f} µs/call" for c, r in row.items()
                        if r["status"] == "ok"]
            continue
        if shape != shape_now:
            lines.append(f"[{shape}]")
            shape_now = shape
        label = name + (f"/{site}" if site else "")
        if o is not None and o["status"] == "ok":
            ot = fmt_t(o["median_s"])
            spread = f"{100 * (o['max_s'] - o['min_s']) / o['median_s']:.0f}%" if o["median_s"] else ""
            gf = f"{o['gflops']:.1f}" if o["gflops"] else ""
        else:
            ot, spread, gf = ("n/a" if o is None else o["status"]), "", ""
        line = f"{label:<{CASE_W}}{ot:>{OURS_W + 1}}{spread:>{SPREAD_W}}{gf:>{GF_W}}  "
        for c in cols:
            line += f"{_cell(row.get(c), c == 'sgemm'):>{COL_W}}"
        lines.append(line.rstrip())
        for c, r in row.items():
            if r["note"]:
                notes.setdefault((c, r["note"]), []).append(f"{name} {shape}" + (f"/{site}" if site else ""))
    steps = [(k, cases[k]) for k in order if k[0] == "full_step"]
    if steps:
        lines += ["", "Full training step (forward, backward, clip, AdamW), time per step and "
                  "ratios (row / column);", "bf16: ours at precision=\"bf16\", torch under "
                  "torch.autocast(\"cpu\", torch.bfloat16):",
                  f"  {'shape':<12} {'precision':<10} times"]
        for (name, shape, site), row in steps:
            ok = {c: r["median_s"] for c, r in row.items() if r["status"] == "ok"}
            for prec in ("fp32", "bf16"):
                mine = {c: t for c, t in ok.items() if precision_of(c) == prec}
                if not mine:
                    continue
                lines += textwrap.wrap(f"  {shape:<12} {prec:<10} " + ", ".join(
                    f"{_bare(c)} {fmt_t(t)}" for c, t in mine.items()), width=100,
                    subsequent_indent=" " * 26)
                base = next((b for b in ("ours", "ours-bf16", "composed") if b in mine), None)
                if base is None or len(ok) < 2:
                    continue
                others = [(_bare(c), t) for c, t in mine.items() if c != base]
                if prec == "bf16" and "ours" in ok:
                    others.append(("ours fp32", ok["ours"]))
                if others:
                    lines += textwrap.wrap(f"    {_bare(base)} is faster than: " + ", ".join(
                        f"{c} ×{t / mine[base]:.2f}" for c, t in others), width=100,
                        subsequent_indent=" " * 6)
    if overhead:
        lines += ["", "Python call overhead (swiglu on 8 floats, out= preallocated):"] + overhead
    if notes:
        lines += ["", "Notes:"]
        for (c, note), where in notes.items():
            w = ", ".join(where[:4]) + (f" (+{len(where) - 4} more)" if len(where) > 4 else "")
            lines += textwrap.wrap(f"{c}: {note} [{w}]", width=100, initial_indent="  ",
                                   subsequent_indent="    ")
    lines.append(f"\nwall time {env.get('wall_time_s')} s")
    return lines


def plot(path, records):
    """One row of panels per shape: left, each kernel's speed-up against every
    contender as horizontal bars (log scale, > 1 = ours faster); right, the
    matmuls' share of the raw sgemm's rate (a separate, linear axis)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter
    except ImportError:
        return "--plot: matplotlib is not installed (pip install matplotlib); no chart written"
    rows = [r for r in records if r["ratio_to_ours"] and r["contender"] != "ours"
            and r["name"] != "call_overhead"]
    if not rows:
        return "--plot: no speed-ups to plot"
    label = lambda r: r["name"] + (f"/{r['site']}" if r["site"] else "")  # noqa: E731
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    conts = [c for c in ORDER if c != "sgemm" and any(r["contender"] == c for r in rows)]
    has_peak = any(r["contender"] == "sgemm" for r in rows)
    panels = []
    for s in shapes:
        labs = list(dict.fromkeys(label(r) for r in rows if r["shape"] == s and r["contender"] != "sgemm"))
        peak = [(label(r), r["ratio_to_ours"]) for r in rows if r["shape"] == s and r["contender"] == "sgemm"]
        panels.append((s, labs, peak))
    per = 0.13 * max(1, len(conts)) + 0.12          # inches per kernel row
    heights = [max(1.5, per * max(1, len(labs))) + 0.8 for _, labs, _ in panels]
    fig, axes = plt.subplots(len(panels), 2 if has_peak else 1, squeeze=False,
                             figsize=(12, sum(heights)), gridspec_kw=dict(
                                 height_ratios=heights,
                                 **({"width_ratios": [3, 1.2]} if has_peak else {})))
    colors = {c: f"C{i}" for i, c in enumerate(conts)}
    h = 0.8 / max(1, len(conts))
    for (shape, labs, peak), ax_row in zip(panels, axes):
        ax = ax_row[0]
        for j, c in enumerate(conts):
            ys, xs = [], []
            for r in rows:
                if r["shape"] == shape and r["contender"] == c and label(r) in labs:
                    ys.append(labs.index(label(r)) + (j - (len(conts) - 1) / 2) * h)
                    xs.append(r["ratio_to_ours"])
            ax.barh(ys, xs, height=h, color=colors[c], label=c)
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}×"))
        ax.set_yticks(range(len(labs)))
        ax.set_yticklabels(labs, fontsize=8)
        ax.set_ylim(len(labs) - 0.5, -0.5)
        ax.set_title(f"{shape}: contender time / ours (log; > 1 = ours faster)", fontsize=10)
        ax.grid(axis="x", which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
        if has_peak:
            ax2 = ax_row[1]
            if peak:
                ax2.barh(range(len(peak)), [100 * v for _, v in peak], height=0.5, color="C7")
                ax2.set_yticks(range(len(peak)))
                ax2.set_yticklabels([lab for lab, _ in peak], fontsize=8)
                ax2.set_ylim(len(peak) - 0.5, -0.5)
                ax2.axvline(100, color="k", lw=0.8)
                ax2.set_xlim(0, max(110, 105 * max(v for _, v in peak)))
            else:
                ax2.set_axis_off()
            ax2.set_title("matmuls: % of a raw sgemm's rate", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return f"wrote {path}"
