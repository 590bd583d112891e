"""The C library half of the build: libanebackward, its headers and its
pkg-config file, installed inside the package next to the cffi module.

One set of sources, compiled once: build_ext compiles csrc/*.c into objects,
links them into anebackward/lib/libanebackward.so.0 (soname libanebackward.so.0,
with the development link libanebackward.so -> libanebackward.so.0 beside it;
libanebackward.0.dylib and libanebackward.dylib on macOS) and hands
the same objects to the cffi module (extra_objects) in place of the sources.
The cffi module keeps its own copy of the code rather than linking the shared
library: `import anebackward` then depends on no run-time search path at all
(editable installs, relocated or repaired wheels behave like a plain install),
and the test hooks (csrc/ab_testing.h) stay out of the library's exports.

The 0 is the ABI version: it changes when a released C API changes
incompatibly. Programs record the soname, so they keep loading the ABI they
were linked against.

Exports: exactly the AB_API functions of csrc/anebackward.h. Everything is
compiled with -fvisibility=hidden, and a linker version script (an exported
symbols list on macOS) naming those functions is the second guard; it also
hides the `.resolver` helpers of the multiversioned (target_clones) kernels.

Finding the BLAS at run time (Linux): pip builds in an isolated environment
whose scipy-openblas32 is deleted after the build, so the
library's RUNPATH is relative to itself: $ORIGIN/../../scipy_openblas32/lib,
i.e. site-packages/anebackward/lib -> site-packages/scipy_openblas32/lib, the
copy that `pip install` put next to it. `anebackward config --libs` also
names that library explicitly, so programs link and run even where the
relative path does not hold (editable installs).
"""
import os
import re
import shlex
import shutil
import sys

from setuptools.command.build_ext import build_ext as _build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(HERE, "csrc")
PACKAGE = "anebackward"
CFFI_MODULE = "anebackward._lib"
LIB_NAME = "anebackward"


sys.path.insert(0, HERE)
from ffibuild import read_version  # noqa: E402  (one reader of the version file)


def public_functions(header=os.path.join(CSRC, "anebackward.h")):
    """The names the library exports: every AB_API function of the public header."""
    with open(header, encoding="utf-8") as f:
        return sorted(set(re.findall(r"\bAB_API\b[^;(]*?\b(ab_\w+)\s*\(", f.read())))


ABI_VERSION = 0   # the soname's version: bump on an incompatible change of a released C API


def shared_lib_filename():
    """The file -l<name> finds: the development link to the versioned library."""
    return "lib%s.dylib" % LIB_NAME if sys.platform == "darwin" else "lib%s.so" % LIB_NAME


def versioned_lib_filename():
    """The library itself, named by its soname (install name on macOS)."""
    if sys.platform == "darwin":
        return "lib%s.%d.dylib" % (LIB_NAME, ABI_VERSION)
    return "lib%s.so.%d" % (LIB_NAME, ABI_VERSION)


# Installed headers: source path -> path under anebackward/include/.
HEADERS = {
    os.path.join(CSRC, "anebackward.h"): "anebackward.h",
    os.path.join(CSRC, "seed_compat.h"): os.path.join("anebackward", "seed_compat.h"),
}

PC_TEMPLATE = """\
# pkg-config file of the anebackward C library (paths relative to this file)
libdir=${pcfiledir}/..
includedir=${pcfiledir}/../../include
openblasdir=${pcfiledir}/../../../scipy_openblas32/lib

Name: anebackward
Description: Backward pass of a Llama-style transformer in C (kernels, model, optimizer)
Version: %(version)s
Cflags: -I${includedir}
Libs: -L${libdir} -Wl,-rpath,${libdir} -l%(lib)s%(extra_libs)s
"""


def _symlink(target, path):
    """path -> target (relative), replacing whatever is at path."""
    tmp = path + ".tmp"
    if os.path.lexists(tmp):
        os.remove(tmp)
    os.symlink(target, tmp)
    os.replace(tmp, path)


class build_ext(_build_ext):
    """build_ext that also builds libanebackward from the cffi module's objects."""

    def _package_dir(self):
        # build/lib.../anebackward, or the source package for --inplace/editable
        return os.path.dirname(self.get_ext_fullpath(CFFI_MODULE))

    def _clib_outputs(self, pkg=None):
        pkg = pkg or self._package_dir()
        out = [os.path.join(pkg, "lib", versioned_lib_filename()),
               os.path.join(pkg, "lib", shared_lib_filename()),
               os.path.join(pkg, "lib", "pkgconfig", "anebackward.pc")]
        out += [os.path.join(pkg, "include", dst) for dst in HEADERS.values()]
        return out

    def copy_extensions_to_source(self):
        # --inplace / editable: setuptools builds into build_lib and copies the
        # extension modules back; copy the library, headers and .pc too.
        super().copy_extensions_to_source()
        build_py = self.get_finalized_command("build_py")
        src_pkg = build_py.get_package_dir(PACKAGE)
        built_pkg = os.path.join(self.build_lib, *PACKAGE.split("."))
        for path in self._clib_outputs(built_pkg):
            dst = os.path.join(src_pkg, os.path.relpath(path, built_pkg))
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            if os.path.islink(path):   # the development link stays a link
                _symlink(os.readlink(path), dst)
                continue
            shutil.copyfile(path, dst + ".tmp")
            os.replace(dst + ".tmp", dst)

    def get_outputs(self):
        return super().get_outputs() + self._clib_outputs()

    def build_extension(self, ext):
        if ext.name != CFFI_MODULE:
            return super().build_extension(ext)
        csrc = [s for s in ext.sources if os.path.abspath(s).startswith(CSRC + os.sep)]
        objects = self.compiler.compile(
            csrc, output_dir=self.build_temp, macros=ext.define_macros,
            include_dirs=ext.include_dirs, extra_postargs=ext.extra_compile_args,
            depends=ext.depends)
        self._link_shared_library(ext, objects)
        self._install_headers_and_pc()
        # the cffi module: its generated source + the same objects
        ext.sources = [s for s in ext.sources if s not in csrc]
        ext.extra_objects = list(ext.extra_objects or []) + objects
        # the objects are its inputs now: without this, build_ext would keep a
        # module older than changed C sources (it compares sources + depends)
        ext.depends = list(ext.depends or []) + objects
        return super().build_extension(ext)

    def _link_shared_library(self, ext, objects):
        libdir = os.path.join(self._package_dir(), "lib")
        os.makedirs(libdir, exist_ok=True)
        out = os.path.join(libdir, versioned_lib_filename())
        tmp = os.path.join(self.build_temp, versioned_lib_filename())
        exports = os.path.join(self.build_temp, "anebackward.exports")
        os.makedirs(self.build_temp, exist_ok=True)
        # The C compiler alone, not Python's LDSHARED: no rpath to Python's own
        # lib dir, no bundle flags; only the -arch choices are kept (macOS).
        ld = self.compiler.linker_so
        cmd = [ld[0]] + [x for i, x in enumerate(ld) if x == "-arch" or (i and ld[i - 1] == "-arch")]
        names = public_functions()
        if sys.platform == "darwin":
            with open(exports, "w") as f:
                f.write("".join("_%s\n" % n for n in names))
            cmd += ["-dynamiclib", "-install_name", "@rpath/" + versioned_lib_filename(),
                    "-Wl,-exported_symbols_list," + exports]
        else:
            with open(exports, "w") as f:
                f.write("{ global: %s local: *; };\n" % "".join("%s; " % n for n in names))
            # -z defs: an unresolved symbol fails the build, not the user's load;
            # -pthread: older glibc keeps pthreads in libpthread
            cmd += ["-shared", "-pthread", "-Wl,--version-script=" + exports,
                    "-Wl,-soname," + versioned_lib_filename(), "-Wl,-z,defs", "-Wl,--enable-new-dtags",
                    "-Wl,-rpath,$ORIGIN/../../scipy_openblas32/lib"]
        cmd += objects + ["-o", tmp]
        cmd += ["-L" + d for d in ext.library_dirs] + ["-l" + lib for lib in ext.libraries]
        cmd += list(ext.extra_link_args)
        # the user's LDFLAGS (e.g. -fsanitize=... from .ci/sanitize) apply here
        # too, as they do to the cffi module through Python's LDSHARED
        cmd += shlex.split(os.environ.get("LDFLAGS", ""))
        self.compiler.spawn(cmd)
        shutil.move(tmp, out)   # never a half-written library in the package
        # the development link that -lanebackward finds (a copy where a wheel
        # cannot hold links: the soname inside still names the versioned file)
        _symlink(versioned_lib_filename(), os.path.join(libdir, shared_lib_filename()))

    def _install_headers_and_pc(self):
        pkg = self._package_dir()
        for src, dst in HEADERS.items():
            path = os.path.join(pkg, "include", dst)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            shutil.copyfile(src, path)
        pcdir = os.path.join(pkg, "lib", "pkgconfig")
        os.makedirs(pcdir, exist_ok=True)
        if sys.platform == "darwin":
            extra = ""
        else:
            import scipy_openblas32 as sob
            extra = (" -L${openblasdir} -Wl,-rpath,${openblasdir}"
                     " -Wl,--push-state,--no-as-needed -l%s -Wl,--pop-state" % sob.get_library())
        with open(os.path.join(pcdir, "anebackward.pc"), "w") as f:
            f.write(PC_TEMPLATE % dict(version=read_version(), lib=LIB_NAME, extra_libs=extra))
