"""The C library as a C program sees it: compiled with nothing but
`python -m anebackward config --cflags --libs` (no path into the checkout),
exports only ab_*, seed_compat.h against float64 oracles, and
examples/c/train.c reproducing the Python API's losses bit for bit.

Needs a C compiler (cc, or $CC); without one these tests are skipped, and
.ci/c-lib runs them from a fresh venv after a non-editable install."""
import os
import re
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pytest

import anebackward as ab

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLE = os.path.join(os.path.dirname(HERE), "examples", "c", "train.c")
CC = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
pytestmark = pytest.mark.skipif(CC is None, reason="no C compiler (cc / $CC) on this machine")
LIB = "libanebackward.dylib" if sys.platform == "darwin" else "libanebackward.so"   # the dev link
SONAME = "libanebackward.0.dylib" if sys.platform == "darwin" else "libanebackward.so.0"
# test and bench hooks (csrc/ab_testing.h): reachable from Python through the
# cffi module, never exported by the library
HOOKS = {"ab_blas_set_num_threads", "ab_ane_f32_to_f16", "ab_ane_rows_to_channels",
         "ab_ane_mil_linear_dx", "ab_pool_stats", "ab_ane_emulated_fail_next"}


def config(*flags):
    out = subprocess.run([sys.executable, "-m", "anebackward", "config", *flags],
                         capture_output=True, text=True, check=True).stdout
    return shlex.split(out)


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """Compile a C file with only the flags `anebackward config` gives."""
    d = tmp_path_factory.mktemp("cprogs")
    flags = config("--cflags", "--libs")

    def compile_(src, extra=()):
        exe = str(d / os.path.splitext(os.path.basename(src))[0])
        subprocess.run([CC, "-O2", "-Wall", "-Wextra", "-Werror", *extra, src, "-o", exe, *flags],
                       check=True)
        return exe
    return compile_


def test_discovery_paths():
    inc, libdir = ab.get_include(), ab.get_lib_dir()
    assert os.path.isfile(os.path.join(inc, "anebackward.h"))
    assert os.path.isfile(os.path.join(inc, "anebackward", "seed_compat.h"))
    assert not os.path.exists(os.path.join(inc, "ab_testing.h"))   # test hooks stay private
    assert os.path.isfile(os.path.join(libdir, LIB))
    assert ab.get_library() == "anebackward"
    assert config("--cflags") == ["-I" + inc]
    libs = config("--libs")
    assert "-L" + libdir in libs and "-lanebackward" in libs
    assert config("--version") == [ab.__version__]
    pc = os.path.join(libdir, "pkgconfig", "anebackward.pc")
    assert f"Version: {ab.__version__}" in open(pc).read()


def test_config_without_a_question_says_what_to_ask():
    r = subprocess.run([sys.executable, "-m", "anebackward", "config"], capture_output=True,
                       text=True)
    assert r.returncode == 2 and "--cflags --libs" in r.stderr


@pytest.mark.skipif(shutil.which("nm") is None,
                    reason="nm (binutils) is not installed: cannot list the library's exports")
def test_shared_library_exports_only_ab_symbols():
    path = os.path.join(ab.get_lib_dir(), LIB)
    if sys.platform == "darwin":
        out = subprocess.run(["nm", "-gU", path], capture_output=True, text=True, check=True).stdout
        names = [line.split()[-1].lstrip("_") for line in out.splitlines() if line.strip()]
    else:
        out = subprocess.run(["nm", "-D", "--defined-only", path], capture_output=True, text=True,
                             check=True).stdout
        names = [line.split()[-1] for line in out.splitlines() if line.strip()]
    assert names and all(n.startswith("ab_") for n in names), [n for n in names if not n.startswith("ab_")]
    # exactly the AB_API functions of the installed header: no test hook
    # (ab_ane_emulated_fail_next), no multiversioning `.resolver` helper
    header = open(os.path.join(ab.get_include(), "anebackward.h")).read()
    api = set(re.findall(r"\bAB_API\b[^;(]*?\b(ab_\w+)\s*\(", header))
    assert "ab_model_backward" in api and "ab_version" in api
    assert set(names) == api, (sorted(set(names) - api), sorted(api - set(names)))
    assert not HOOKS & set(names) and not HOOKS & api
    from anebackward._native import lib
    assert all(hasattr(lib, h) for h in HOOKS)   # the tests still reach them


def test_library_has_a_versioned_soname(build, tmp_path):
    libdir = ab.get_lib_dir()
    real, dev = os.path.join(libdir, SONAME), os.path.join(libdir, LIB)
    assert os.path.isfile(real) and os.path.isfile(dev)
    with open(real, "rb") as a, open(dev, "rb") as b:   # a link, or a copy in a wheel
        assert a.read() == b.read()
    src = tmp_path / "v.c"
    src.write_text('#include <anebackward.h>\nint main(void) { return ab_version()[0] ? 0 : 1; }\n')
    exe = build(str(src))
    if sys.platform == "darwin":
        out = subprocess.run(["otool", "-L", exe], capture_output=True, text=True, check=True).stdout
        assert "@rpath/" + SONAME in out, out
    else:
        tool = shutil.which("readelf")
        if tool is None:
            pytest.skip("readelf (binutils) is not installed: cannot read the program's DT_NEEDED")
        out = subprocess.run([tool, "-d", exe], capture_output=True, text=True, check=True).stdout
        assert f"[{SONAME}]" in out, out   # the program records the versioned name
        lib_out = subprocess.run([tool, "-d", real], capture_output=True, text=True, check=True).stdout
        assert f"Library soname: [{SONAME}]" in lib_out, lib_out
    assert subprocess.run([exe]).returncode == 0


def test_readme_pkg_config_line_links(tmp_path):
    """The README's line, as written, after whatever install this is
    (editable in the README's own test set-up, regular in .ci/c-lib)."""
    if shutil.which("pkg-config") is None:
        pytest.skip("pkg-config is not installed (apt install pkg-config) to check the .pc file")
    readme = open(os.path.join(os.path.dirname(HERE), "README.md"), encoding="utf-8").read()
    line = "PKG_CONFIG_PATH=$(anebackward config --pkgconfigdir) pkg-config --cflags --libs anebackward"
    assert line in readme
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    flags = subprocess.run(["sh", "-c", line], capture_output=True, text=True, env=env)
    assert flags.returncode == 0, flags.stderr
    src = tmp_path / "v.c"
    src.write_text('#include <stdio.h>\n#include <anebackward.h>\n'
                   'int main(void) { printf("%s %s\\n", ab_version(), ab_blas_name()); return 0; }\n')
    exe = str(tmp_path / "v")
    subprocess.run([CC, str(src), "-o", exe, *shlex.split(flags.stdout)], check=True)
    clean = {k: os.environ[k] for k in ("PATH", "LD_PRELOAD") if k in os.environ}   # (LD_PRELOAD:
    r = subprocess.run([exe], capture_output=True, text=True, env=clean)   # the sanitizer's runtime)
    assert r.returncode == 0 and r.stdout.startswith(ab.__version__), r.stdout + r.stderr


def test_c_api_program(build):
    exe = build(os.path.join(HERE, "c", "test_capi.c"))
    r = subprocess.run([exe, ab.__version__], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_seed_compat_program(build):
    exe = build(os.path.join(HERE, "c", "test_seed_compat.c"), extra=("-pthread",))
    r = subprocess.run([exe], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "the seed's formula (rms^2) FAILS the same oracle" in r.stdout


def synthetic_stream(n, vocab):
    """examples/c/train.c's synthetic tokens: (3 i + i // 5) % vocab."""
    i = np.arange(n, dtype=np.int64)
    return ((3 * i + i // 5) % vocab).astype(np.int32)


def python_losses(checkpoint, stream, steps, B, S, clip, lr=5e-4):
    """What train.c does, through the Python API: Llama + AdamW."""
    model = ab.Llama.load(checkpoint)
    opt = ab.AdamW(model, lr=lr)
    losses = []
    for step in range(steps):
        idx = (step * B * S + np.arange(B * S)) % len(stream)
        losses.append(model.forward(stream[idx].reshape(B, S)))
        model.backward()
        if clip:
            model.clip_grad_norm(clip)
        opt.step()
    return losses, model


def c_losses(stdout):
    return [float(line.split()[3]) for line in stdout.splitlines() if line.startswith("step ")]


@pytest.mark.parametrize("tied, data, steps", [(True, False, 20), (False, True, 6)])
def test_train_c_matches_python_bit_for_bit(build, tmp_path, tied, data, steps):
    exe = build(EXAMPLE)
    cfg = ab.LlamaConfig.preset("tiny", shared_classifier=tied)
    ckpt, out = str(tmp_path / "model.bin"), str(tmp_path / "trained.bin")
    ab.Llama(cfg, seed=1).save(ckpt)
    B, S, clip = 2, 16, 1.0
    args = [exe, ckpt, "-n", str(steps), "-b", str(B), "-s", str(S), "--clip", str(clip), "-o", out]
    if data:
        stream = np.random.default_rng(3).integers(0, cfg.vocab_size, 1000).astype(np.uint16)
        stream.tofile(tmp_path / "data.bin")
        args += ["-d", str(tmp_path / "data.bin")]
        stream = stream.astype(np.int32)
    else:
        stream = synthetic_stream(steps * B * S, cfg.vocab_size)
    r = subprocess.run(args, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    got = c_losses(r.stdout)
    want, model = python_losses(ckpt, stream, steps, B, S, clip)
    assert len(got) == steps
    assert got == want                                   # to the last bit (%.17g round-trips)
    assert data or want[-1] < want[0]                  # the synthetic pattern is learnt
    np.testing.assert_array_equal(ab.Llama.load(out).flat_params, model.flat_params)
    mask = os.umask(0)
    os.umask(mask)
    assert os.stat(out).st_mode & 0o777 == 0o666 & ~mask   # as open() would create it, not 0600


def test_train_c_bad_input_is_a_message_and_an_exit_code(build, tmp_path):
    exe = build(EXAMPLE)
    cfg = ab.LlamaConfig.preset("tiny")
    ckpt = tmp_path / "model.bin"
    ab.Llama(cfg, seed=0).save(str(ckpt))
    (tmp_path / "short.bin").write_bytes(ckpt.read_bytes()[:1000])
    np.array([1, 2, cfg.vocab_size], np.uint16).tofile(tmp_path / "bad_tokens.bin")
    cases = [([str(tmp_path / "missing.bin")], "No such file"),
             ([str(tmp_path / "short.bin")], "truncated"),
             ([str(ckpt), "-d", str(tmp_path / "bad_tokens.bin")], "outside the model's vocabulary"),
             ([str(ckpt), "-s", "1000"], "max_seq_len"),
             ([str(ckpt), "-n", "two"], "-n must be an integer"),
             ([str(ckpt), "-n", "1", "-o", str(tmp_path / "no" / "dir.bin")], "cannot create")]
    for argv, message in cases:
        r = subprocess.run([exe, *argv], capture_output=True, text=True)
        assert r.returncode > 0, (argv, r.returncode, r.stderr)   # an exit code, not a signal
        assert message in r.stderr, (argv, r.stderr)
