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
    assert doc["environment"]["threads_list"] == [1, 2]


def test_scaling_rejects_bad_thread_lists():
    with pytest.raises(SystemExit, match="threads-list"):
        main(["bench", "--scaling", "--threads-list", "0,2"])
