# The one version string: read by pyproject.toml (setuptools dynamic version),
# compiled into the C library (ab_version(), ffibuild.py) and re-exported as
# anebackward.__version__.
__version__ = "0.1.0"
