"""cffi builder (out-of-line API mode) for anebackward._lib.

The cdef is read from csrc/anebackward.h between its CDEF markers, and the
same header is #included by the C sources: one declaration, two readers.
setup.py names this file in `cffi_modules`.

BLAS: Accelerate on macOS; elsewhere OpenBLAS from the scipy-openblas32
wheel (headers and library found through its own get_include_dir() /
get_lib_dir()). At run time anebackward/_native.py loads that library first,
so no rpath into the (possibly temporary) build environment is needed.

Opt-in tuning: ANEBACKWARD_NATIVE=1 at build time adds -march=native (the
default build runs on any x86-64 / arm64 machine).
"""
import glob
import os
import sys

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(HERE, "csrc")
API_HEADER = os.path.join(CSRC, "anebackward.h")
TESTING_HEADER = os.path.join(CSRC, "ab_testing.h")   # test hooks, not public


def read_version():
    """The one version string: anebackward/_version.py (also read by
    pyproject.toml and compiled into ab_version())."""
    ns = {}
    with open(os.path.join(HERE, "anebackward", "_version.py"), encoding="utf-8") as f:
        exec(f.read(), ns)
    return ns["__version__"]


def read_cdef(path=API_HEADER):
    text = open(path, encoding="utf-8").read()
    begin, end = "/* CDEF BEGIN */", "/* CDEF END */"
    if begin not in text or end not in text:
        raise RuntimeError(f"{path}: missing CDEF markers")
    # AB_API (the export attribute) is for C compilers, not for cffi's parser.
    return text.split(begin, 1)[1].split(end, 1)[0].replace("AB_API ", "")


def c_sources():
    # ANE platform back ends compile only where they can run. setup.py's
    # build_ext (clibbuild.py) compiles these once for both the cffi module
    # and libanebackward.
    srcs = sorted(glob.glob(os.path.join(CSRC, "**", "*.c"), recursive=True))
    if sys.platform != "darwin":
        srcs = [s for s in srcs if not s.endswith("_darwin.c")]
    else:
        # the Objective-C @try around the framework's calls (ane_darwin_guard.m,
        # enabled in ane_darwin.c by AB_ANE_OBJC_GUARD): plain C cannot catch
        # an Objective-C exception, which would otherwise end the process
        srcs += sorted(glob.glob(os.path.join(CSRC, "ane", "*.m")))
    return [os.path.relpath(s, HERE) for s in srcs]


def build_options():
    cflags = ["-O3", "-std=gnu11", "-fopenmp-simd", "-fno-math-errno", "-fno-trapping-math",
              "-fvisibility=hidden", "-Wall", "-Wextra", "-Wno-unused-parameter"]
    if os.environ.get("ANEBACKWARD_NATIVE") == "1":
        cflags += ["-march=native", "-DAB_NO_MULTIVERSION"]
    opts = dict(include_dirs=[CSRC, os.path.join(CSRC, "ane")], libraries=[], library_dirs=[],
                extra_compile_args=cflags, extra_link_args=[], define_macros=[])
    if sys.platform == "darwin":
        opts["define_macros"] += [("ACCELERATE_NEW_LAPACK", None), ("AB_ANE_OBJC_GUARD", None)]
        opts["extra_link_args"] += ["-framework", "Accelerate"]
        # ANE platform (csrc/ane/ane_darwin.c): objc runtime + CF/IOSurface;
        # the private AppleNeuralEngine.framework itself is dlopen()ed at run time.
        opts["extra_link_args"] += ["-framework", "Foundation", "-framework", "CoreFoundation",
                                    "-framework", "IOSurface", "-lobjc"]
    else:
        import scipy_openblas32 as sob
        opts["include_dirs"].append(sob.get_include_dir())
        opts["library_dirs"].append(sob.get_lib_dir())
        opts["libraries"].append(sob.get_library())
        opts["libraries"].append("m")
        opts["libraries"].append("dl")   # oneDNN (bf16) is dlopen()ed at run time
    flags = " ".join(cflags)
    opts["define_macros"].append(("AB_BUILD_FLAGS", '"%s"' % flags))
    opts["define_macros"].append(("AB_VERSION", '"%s"' % read_version()))
    return opts


ffibuilder = FFI()
# Python's side of the C callbacks (cffi's extern "Python"), defined with
# @ffi.def_extern in the module named: anebackward/model.py
PY_CALLBACKS = 'extern "Python" void ab_py_grads_ready(void *user, int64_t group);\n'
ffibuilder.cdef(read_cdef() + read_cdef(TESTING_HEADER) + PY_CALLBACKS)
ffibuilder.set_source(
    "anebackward._lib",
    '#include "anebackward.h"\n#include "ab_testing.h"\n',
    sources=c_sources(),
    **build_options(),
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
