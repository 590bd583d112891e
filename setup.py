"""setup.py — builds anebackward._lib from csrc/ through cffi (ffibuild.py).

Metadata and build requirements live in pyproject.toml; this file only
wires the cffi module into setuptools.
"""
from setuptools import setup

setup(cffi_modules=["ffibuild.py:ffibuilder"])
