"""The benchmark suite runs through the CLI and writes well-formed records.
Timings are not asserted (speed belongs to the benchmark, not to a test)."""
import json
import math
import os
import subprocess
import sys

import pytest

from anebackward.bench import cases as K

from conftest import import_torch

KEYS = {"name", "shape", "site", "dims", "contender", "precision", "status", "median_s", "min_s",
        "max_s", "repeats", "gflops", "ratio_to_ours", "note"}


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "quick.json"
    env = dict(os.environ)
    env.pop("ANEBACKWARD_BACKEND", None)   # "ours" must be the fast kernels
    proc = subprocess.run([sys.executable, "-m", "anebackward", "bench", "--quick", "--json",
                           str(path)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with open(path) as f:
        return json.load(f), proc.stdout


def _by(records, **kw):
    return [r for r in records if all(r[k] == v for k, v in kw.items())]


def test_quick_records_every_kernel(quick):
    doc, out = quick
    recs = doc["records"]
    assert recs and all(set(r) == KEYS for r in recs)
    for kernel in K.KERNELS:
        ours = _by(recs, name=kernel, contender="ours")
        assert ours, f"no record for {kernel}"
        for r in ours:
            assert r["status"] == "ok", r
            assert 0 < r["min_s"] <= r["median_s"] <= r["max_s"]
            assert r["ratio_to_ours"] == pytest.approx(1.0)
            assert r["shape"] == "tiny" and r["repeats"] >= 1
    # every linear site is compared with the raw sgemm of the same shape, with GFLOP/s
    for kernel in K.LINEAR:
        sites = {site for site, _, _ in K.linear_sites(K.SHAPES["tiny"])}
        assert {r["site"] for r in _by(recs, name=kernel, contender="ours")} == sites
        for r in _by(recs, name=kernel, contender="sgemm"):
            assert r["status"] == "ok"
            o = _by(recs, name=kernel, site=r["site"], contender="ours")[0]
            assert r["ratio_to_ours"] == pytest.approx(r["median_s"] / o["median_s"])
            d = r["dims"]
            assert o["gflops"] == pytest.approx(2 * d["N"] * d["n_in"] * d["n_out"] / o["median_s"] / 1e9)
        assert len(_by(recs, name=kernel, contender="sgemm")) == len(sites)
    # NumPy and the reference backend on every kernel at the tiny shape
    for contender in ("numpy", "reference"):
        for kernel in K.KERNELS:
            rs = _by(recs, name=kernel, contender=contender)
            assert rs and all(r["status"] == "ok" and r["median_s"] > 0 for r in rs), (kernel, rs)
    assert _by(recs, name="call_overhead", contender="ours")[0]["median_s"] > 0
    env = doc["environment"]
    for key in ("cpu", "cores", "blas", "blas_core", "threads", "anebackward", "build_flags",
                "OPENBLAS_CORETYPE", "date_utc"):
        assert key in env
    assert "machine" in out and "ours median" in out


def test_quick_full_step_runs_every_contender(quick):
    doc, out = quick
    ours = _by(doc["records"], name="full_step", contender="ours")
    assert len(ours) == 1
    assert ours[0]["status"] == "ok" and ours[0]["median_s"] > 0
    for contender in ("numpy", "reference", "composed"):
        r = _by(doc["records"], name="full_step", contender=contender)
        assert r and r[0]["status"] == "ok"


def test_quick_full_step_has_bf16_rows_or_says_why(quick):
    """The full step at precision "bf16" (ours, and torch under autocast):
    records marked bf16 and a bf16 row in the table; where bf16 cannot run,
    the records say why. Whether it can is asked of a fresh process, as the
    bench ran in one (this process's bf16 path may have been set by a test)."""
    doc, out = quick
    fresh = subprocess.run([sys.executable, "-c", "from anebackward import bf16; "
                            "print(bf16.available())"], capture_output=True, text=True, timeout=60)
    assert fresh.returncode == 0, fresh.stderr
    can = fresh.stdout.split()[-1] == "True"
    if os.environ.get("ANEBACKWARD_REQUIRE_BF16") == "1":
        assert can, "ANEBACKWARD_REQUIRE_BF16=1 but bf16 cannot run here"
    try:
        import torch  # noqa: F401
        has_torch = True
    except ImportError:
        has_torch = False
    for contender, runs in (("ours-bf16", can), ("torch-bf16", can and has_torch)):
        r = _by(doc["records"], name="full_step", contender=contender)
        assert len(r) == 1 and r[0]["precision"] == "bf16", r
        if runs:
            assert r[0]["status"] == "ok" and r[0]["median_s"] > 0, r
        else:                   # says why: bf16, or torch, is missing
            assert r[0]["status"] == "unavailable" and r[0]["note"], r
            assert not can or "torch" in r[0]["note"], r
            assert can or "bf16" in r[0]["note"], r
    assert all(r["precision"] == "fp32" for r in doc["records"]
               if not r["contender"].endswith("-bf16"))
    assert not _by(doc["records"], name="rmsnorm", contender="ours-bf16")
    if can:
        assert "tiny         bf16       ours" in out and "bf16 path: " in out


def test_quick_torch_contender_or_says_so(quick):
    doc, _ = quick
    recs = _by(doc["records"], contender="torch")
    try:
        import torch  # noqa: F401
    except ImportError:
        import_torch()  # fails under ANEBACKWARD_REQUIRE_TORCH=1, else skips
    for kernel in K.KERNELS + ("full_step",):
        rs = _by(recs, name=kernel)
        assert rs and all(r["status"] == "ok" for r in rs), (kernel, rs)


def test_filters_and_bad_names(tmp_path):
    path = tmp_path / "f.json"
    proc = subprocess.run([sys.executable, "-m", "anebackward", "bench", "--quick", "--kernels",
                           "rmsnorm*", "--contenders", "numpy", "--json", str(path),
                           "--no-progress"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    recs = json.loads(path.read_text())["records"]
    assert {r["name"] for r in recs} == {"rmsnorm", "rmsnorm_backward"}
    assert {r["contender"] for r in recs} == {"ours", "numpy"}
    bad = subprocess.run([sys.executable, "-m", "anebackward", "bench", "--kernels", "nope"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "unknown kernel 'nope'" in bad.stderr


def test_flop_counts():
    c = K.cases(["stories15M"], ["linear", "attention", "attention_backward"])
    cls = [x for x in c if x.site == "cls"][0]
    assert cls.flops == 2 * 256 * 288 * 32000
    att = [x for x in c if x.kernel == "attention"][0]
    assert att.flops == 2 * 256 * 256 * 48 * 6
    assert K.n_params(K.SHAPES["stories15M"]) == 32000 * 288 + 6 * (4 * 288 * 288 + 3 * 288 * 768
                                                                     + 2 * 288) + 288
    assert math.isclose(K.n_params(K.SHAPES["stories110M"]) / 1e6, 109.5, abs_tol=0.2)


@pytest.mark.slow   # a subprocess run of its own (see pyproject's markers)
def test_installed_package_has_every_contender(tmp_path, torch):
    """The package alone, away from the source tree (as pip installs it), must
    time NumPy and PyTorch too: the contenders live inside it. (They used to
    live in the checkout's bench/ folder: 'bench/ folder not found'.)"""
    import shutil
    import anebackward
    site = tmp_path / "site"
    shutil.copytree(os.path.dirname(anebackward.__file__), site / "anebackward",
                    ignore=shutil.ignore_patterns("__pycache__"))
    env = dict(os.environ, PYTHONPATH=str(site))
    env.pop("ANEBACKWARD_BACKEND", None)
    path = tmp_path / "i.json"
    proc = subprocess.run([sys.executable, "-m", "anebackward", "bench", "--quick", "--kernels",
                           "swiglu,full_step", "--contenders", "ours,numpy,torch", "--repeats", "1",
                           "--json", str(path), "--no-progress"],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads(path.read_text())
    assert doc["environment"]["anebackward"] == anebackward.__version__
    for kernel in ("swiglu", "full_step"):
        for contender in ("ours", "numpy", "torch"):
            r = _by(doc["records"], name=kernel, contender=contender)
            assert r and r[0]["status"] == "ok", (kernel, contender, r)


def test_bench_threads_leave_the_packages_openblas_single_threaded():
    """threadpoolctl (the bench extra) limits every OpenBLAS it finds, the
    package's included: the bench must then put the package's back to one
    thread under its pool, or each sgemm tile would run on a second pool."""
    import numpy as np
    import threadpoolctl
    import anebackward as ab
    from anebackward.bench import env as E
    before = ab.get_num_threads()
    limiter = E.set_threads(2, None)
    try:
        assert ab.get_num_threads() == 2 and ab.blas_info()["threads"] in (0, 1)
        numpy_pools = [p for p in threadpoolctl.threadpool_info()
                       if "numpy" in (p.get("filepath") or "")]
        assert all(p["num_threads"] == 2 for p in numpy_pools)
        # the raw sgemm contender runs on OpenBLAS's own threads, then restores
        sgemm, where = K.sgemm_library()
        if sgemm is None:
            pytest.skip(where)      # macOS: Accelerate, no raw sgemm contender
        case = next(c for c in K.cases(["tiny"], ["linear"]))
        inp = K.inputs(case, np.random.default_rng(0))
        y = K.sgemm_callable(case, inp, sgemm, threads=2)()
        np.testing.assert_allclose(y, inp["x"] @ inp["W"].T, rtol=1e-4, atol=1e-5)
        assert ab.blas_info()["threads"] in (0, 1)
    finally:
        limiter.restore_original_limits()
        ab.set_num_threads(before)


def test_quick_output_fits_100_columns(quick):
    _, out = quick
    lines = out.splitlines()
    assert any(line.startswith("kernel") and "ours median" in line for line in lines)
    wide = [line for line in lines if len(line) > 100]
    assert not wide, wide


def test_plot_has_one_panel_row_per_shape_and_a_separate_peak_axis(tmp_path):
    """--plot: one row per shape (speed-ups as horizontal bars, log axis; the
    matmuls' share of the raw sgemm on its own linear axis), screen-width."""
    pytest.importorskip("matplotlib", reason="matplotlib (a dependency) draws --plot")
    from anebackward.bench import report

    def rec(name, shape, site, contender, ratio):
        return dict(name=name, shape=shape, site=site, dims={}, contender=contender, status="ok",
                    median_s=1e-3, min_s=1e-3, max_s=1e-3, repeats=3, gflops=None,
                    ratio_to_ours=ratio, note="")
    recs = []
    for shape in ("stories15M", "gqa15M"):
        for c, x in (("ours", 1.0), ("numpy", 2.0), ("torch", 1.5), ("sgemm", 0.9)):
            recs.append(rec("linear", shape, "wq", c, x))
        for c, x in (("ours", 1.0), ("numpy", 3.0), ("torch", 0.8)):
            recs.append(rec("rmsnorm", shape, "", c, x))
    path = tmp_path / "p.png"
    assert report.plot(str(path), recs) == f"wrote {path}"
    import matplotlib.image
    h, w = matplotlib.image.imread(str(path)).shape[:2]
    assert w <= 1300 and h <= 2 * w, (w, h)   # readable at screen width, no 3836-px strip
    import matplotlib.pyplot as plt
    seen = {}
    orig = plt.subplots

    def spy(*a, **kw):
        fig, axes = orig(*a, **kw)
        seen["shape"] = axes.shape
        return fig, axes
    plt.subplots = spy
    try:
        report.plot(str(path), recs)
    finally:
        plt.subplots = orig
    assert seen["shape"] == (2, 2)   # two shapes x (speed-ups, fraction of peak)
