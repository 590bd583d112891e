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


def test_scaling_run_writes_every_row(tmp_path, capsys):
    out = tmp_path / "s.json"
    assert main(["bench", "--scaling", "--quick", "--shapes", "tiny", "--threads-list", "1,2",
                 "--kernels", "rmsnorm_backward,linear,full_step", "--repeats", "1",
                 "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "full_step tiny" in text and "rmsnorm_backward tiny" in text
    doc = json.loads(out.read_text())
    names = [r["name"] for r in doc["records"]]
    assert names[0].startswith("sgemm") and "full_step tiny" in names
    step = next(r for r in doc["records"] if r["name"] == "full_step tiny")
    assert set(step["median_s"]) == {"1", "2"} and step["fraction_of_sgemm_rate"]["2"] > 0
    # at this tiny shape much of the step is too small to split; the share is measured
    assert 0.0 < step["parallel_share_1"] <= 1.0
    assert 1.0 <= step["bound_speedup"]["2"] <= 2.0 + 1e-9
    assert doc["environment"]["threads_list"] == [1, 2]


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
