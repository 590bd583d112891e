"""python -m anebackward.ane.probe: the report a maintainer asks a Mac user
for. Here it runs on the emulator (the same code and report format as on a
Mac), and without any ANE it says why and stops."""
import os
import re
import subprocess
import sys

SECTIONS = ["anebackward ANE probe", "[shape sweep]", "[saturation]", "[timings]", "[model step]",
            "[compiles]", "[status]"]


def run(*args, **env):
    e = {k: v for k, v in os.environ.items() if k != "ANEBACKWARD_ANE"}
    e.update(env)
    return subprocess.run([sys.executable, "-m", "anebackward.ane.probe", *args], capture_output=True,
                          text=True, env=e, timeout=300)


def test_probe_report_under_the_emulator():
    r = run("--emulate", "--repeat", "1", "--models", "stories15M")
    assert r.returncode == 0, r.stdout + r.stderr
    text = r.stdout
    pos = [text.find(s) for s in SECTIONS]
    assert all(p >= 0 for p in pos) and pos == sorted(pos), text
    assert "platform: emulated   available: yes" in text
    assert re.search(r"self-test: passed: 256x768x768 dx, relative error \d\.\d\de-0\d", text), text
    rows = re.findall(r"^\s+(\d+)\s+(\d+)\s+(\d+)\s+(ok|WRONG|ERROR)\s", text, re.M)
    assert [r[:3] for r in rows] == [("32", "32", "32"), ("64", "64", "64"), ("256", "768", "768"),
                                     ("256", "768", "3072")], text
    assert all(r[3] == "ok" for r in rows), text
    assert "raw program output: inf" in text, "the emulator overflows to inf"
    assert "dispatch: fallback=fp16 overflow or saturation, result = CPU" in text
    assert "compiled and ran: 150 of 150" in text and "first failure: none" in text
    # the timing table: every column defined, one row per kernel and layer shape
    for col in ("MFLOP", "cpu", "ane", "stage", "cpu/ane"):
        assert re.search(rf"^\s+(columns: )?{re.escape(col)}\s+\S", text, re.M), col
    rows = re.findall(r"^  stories15M\s+(linear|linear_backward_dx)\s+256\s+(\d+)\s+(\d+)\s+([\d.]+)\s+"
                      r"([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+(ane|cpu)$", text, re.M)
    assert sorted((k, int(i), int(o)) for k, i, o, *_ in rows) == sorted(
        (k, i, o) for k in ("linear", "linear_backward_dx") for i, o in [(288, 288), (288, 768), (768, 288)]), text
    # the verdict follows from the table: the smallest FLOP count from which the ANE won every row
    won = [(float(r[3]), r[8] == "ane") for r in rows]
    for r in rows:
        assert (r[8] == "ane") == (float(r[5]) < float(r[4])) or r[5] == r[4], r
    ok = [f for f, _ in won if all(w for g, w in won if g >= f)]
    m = re.search(r"recommended min_flops = (\d+)", text)
    if ok:
        assert m and abs(int(m.group(1)) / 1e6 - min(ok)) < 0.1, text
    else:
        assert m is None and "recommended min_flops: none" in text, text
    assert re.search(r"the ANE was faster in (\d) of 6 calls", text).group(1) == str(sum(w for _, w in won))
    assert re.search(r"^  stories15M\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+(ane|cpu)$", text, re.M), text


def test_probe_without_an_ane_says_why():
    r = run(ANEBACKWARD_ANE="off")
    assert r.returncode == 1
    assert "available: no" in r.stdout and "disabled by ANEBACKWARD_ANE='off'" in r.stdout


def test_probe_rejects_bad_arguments():
    r = run("--emulate", "--repeat", "0")
    assert r.returncode == 2 and "--repeat" in r.stderr
    r = run("--emulate", "--models", "stories7B")
    assert r.returncode == 2 and "--models" in r.stderr
