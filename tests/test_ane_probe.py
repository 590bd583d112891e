"""python -m anebackward.ane.probe: the report a maintainer asks a Mac user
for. Here it runs on the emulator (the same code and report format as on a
Mac), and without any ANE it says why and stops."""
import os
import re
import subprocess
import sys

SECTIONS = ["anebackward ANE probe", "[shape sweep]", "[saturation]", "[timings]", "[compiles]", "[status]"]


def run(*args, **env):
    e = {k: v for k, v in os.environ.items() if k != "ANEBACKWARD_ANE"}
    e.update(env)
    return subprocess.run([sys.executable, "-m", "anebackward.ane.probe", *args], capture_output=True,
                          text=True, env=e, timeout=300)


def test_probe_report_under_the_emulator():
    r = run("--emulate", "--repeat", "1")
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
    assert re.search(r"auto rule from this sweep: (min_flops = \d+|the ANE won at no swept size)", text)
    assert "compiled and ran: 150 of 150" in text and "first failure: none" in text
    assert len(re.findall(r"^\s+\d+\s+\d+\s+\d+\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+[\d.]+$", text, re.M)) == 4, text


def test_probe_without_an_ane_says_why():
    r = run(ANEBACKWARD_ANE="off")
    assert r.returncode == 1
    assert "available: no" in r.stdout and "disabled by ANEBACKWARD_ANE='off'" in r.stdout


def test_probe_rejects_bad_arguments():
    r = run("--emulate", "--repeat", "0")
    assert r.returncode == 2 and "--repeat" in r.stderr
