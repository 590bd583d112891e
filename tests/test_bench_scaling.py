"""`anebackward bench --scaling`: the Amdahl fit recovers a known serial
fraction, and a tiny run prints every row and writes its JSON."""
import json

import pytest

from anebackward.__main__ import main
from anebackward.bench.scaling import amdahl_fit, amdahl_speedup

pytestmark = pytest.mark.usefixtures("keep_blas_threads")


def test_amdahl_fit_recovers_the_serial_fraction():
    for s in (0.0, 0.05, 0.3, 1.0):
        times = {n: 1.0 / amdahl_speedup(s, n) for n in (1, 2, 4, 8)}
        assert amdahl_fit([1, 2, 4, 8], times) == pytest.approx(s, abs=1e-12)
    assert amdahl_fit([1], {1: 1.0}) is None
    assert amdahl_speedup(0.05, 16) == pytest.approx(1 / (0.05 + 0.95 / 16))


@pytest.mark.slow
def test_scaling_run_writes_every_row(tmp_path, capsys):
    out = tmp_path / "s.json"
    assert main(["bench", "--scaling", "--quick", "--shapes", "tiny", "--threads-list", "1,2",
                 "--kernels", "rmsnorm_backward,linear,full_step", "--repeats", "1",
                 "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "full_step tiny" in text and "rmsnorm_backward tiny" in text
    # the column header comes once, before the first row
    head = [i for i, l in enumerate(text.splitlines()) if l.startswith("row ")]
    assert len(head) == 1 and "sgemm%2" in text.splitlines()[head[0]]
    doc = json.loads(out.read_text())
    names = [r["name"] for r in doc["records"]]
    assert names[0].startswith("sgemm") and "full_step tiny" in names
    step = next(r for r in doc["records"] if r["name"] == "full_step tiny")
    assert set(step["median_s"]) == {"1", "2"} and step["fraction_of_sgemm_rate"]["2"] > 0
    # at this tiny shape much of the step is too small to split; the share is measured
    assert 0.0 < step["parallel_share_1"] <= 1.0
    assert 1.0 <= step["bound_speedup"]["2"] <= 2.0 + 1e-9
    assert doc["environment"]["threads_list"] == [1, 2]
    stream = next(r for r in doc["records"] if r["name"].startswith("memory stream"))
    assert all(stream["bandwidth_GBps"][n] > 0 for n in ("1", "2"))
    rms = next(r for r in doc["records"] if r["name"] == "rmsnorm_backward tiny")
    assert rms["speedup_over_stream"]["2"] == pytest.approx(
        rms["speedup"]["2"] / stream["speedup"]["2"])
    assert doc["environment"]["python_overhead_s"] >= 0
    assert 0 < rms["cpu_utilization"]["1"] <= 1.5 and rms["cpu_utilization"]["2"] > 0


def test_c_entry_replays_the_api_calls_c_kernels_on_the_same_buffers():
    """The kernel rows time the C calls an API call makes: replaying them
    after the input changed in place gives what the API gives on it."""
    import numpy as np
    import anebackward as ab
    from anebackward.bench.scaling import c_entry
    rng = np.random.default_rng(3)
    x, w = rng.standard_normal((4, 16), dtype=np.float32), np.ones(16, np.float32)
    y = np.empty_like(x)
    replay = c_entry(lambda: ab.rmsnorm(x, w, out=y))
    x *= 3.0
    y[...] = np.nan
    replay()
    np.testing.assert_array_equal(y, ab.rmsnorm(x, w))
    # clip_grad_norm makes two C calls (sumsq, then scale by the factor Python
    # computed from it): the replay repeats both, the factor as recorded
    g = rng.standard_normal(100, dtype=np.float32) * np.float32(5.0)
    g0 = g.copy()
    replay = c_entry(lambda: ab.clip_grad_norm([g], 1.0))
    factor = g[0] / g0[0]
    assert factor < 1.0
    g[...] = 10.0
    replay()
    np.testing.assert_array_equal(g, np.float32(10.0) * np.float32(factor))
    with pytest.raises(RuntimeError, match="no C kernel call"):
        c_entry(lambda: None)


def test_pool_stats_count_parallel_regions_only():
    import numpy as np
    import anebackward as ab
    from anebackward._native import ffi, lib
    ab.set_num_threads(1)
    ns, regions, bound = ffi.new("int64_t*"), ffi.new("int64_t*"), ffi.new("int64_t[4]")
    lib.ab_pool_stats(1, ffi.NULL, ffi.NULL, ffi.NULL)
    ab.swiglu(np.ones(8, np.float32), np.ones(8, np.float32))          # one task: not counted
    lib.ab_pool_stats(2, ns, regions, bound)
    assert regions[0] == 0 and ns[0] == 0
    ab.swiglu(np.ones(5 * 16384, np.float32), np.ones(5 * 16384, np.float32))   # 5 tasks
    lib.ab_pool_stats(0, ns, regions, bound)
    assert regions[0] == 1 and ns[0] > 0
    # 5 equal tasks: 3 rounds on 2 threads, 2 on 4, 1 on 8 and 16
    assert [bound[i] for i in range(4)] == pytest.approx([ns[0] * f for f in (.6, .4, .2, .2)],
                                                         rel=1e-6, abs=2)


def test_scaling_rejects_bad_thread_lists():
    with pytest.raises(SystemExit, match="threads-list"):
        main(["bench", "--scaling", "--threads-list", "0,2"])


def test_record_calls_records_this_threads_kernel_calls_only():
    import threading

    import numpy as np

    import anebackward as ab
    from anebackward._backend import record_calls
    x, w = np.ones((2, 8), np.float32), np.ones(8, np.float32)
    other = []
    with record_calls() as calls:
        y = ab.rmsnorm(x, w)
        t = threading.Thread(target=lambda: other.append(ab.rmsnorm(x, w)))
        t.start()
        t.join()
    ab.rmsnorm(x, w)                       # after the block: not recorded
    assert [f for f, _ in calls] == [ab._native.lib.ab_rmsnorm_forward]
    np.testing.assert_array_equal(other[0], y)
