"""setup.py — builds anebackward._lib from csrc/ through cffi (ffibuild.py),
and from the same compiled objects the C library libanebackward with its
headers and pkg-config file (clibbuild.py).

Metadata and build requirements live in pyproject.toml; this file only
wires the cffi module and the C library into setuptools.
"""
import os
import sys

from setuptools import setup

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from clibbuild import build_ext  # noqa: E402

setup(cffi_modules=["ffibuild.py:ffibuilder"], cmdclass={"build_ext": build_ext})
