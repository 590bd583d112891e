"""The package as a user meets it: its version, in one place and reported."""
import pytest

import anebackward as ab
from anebackward.__main__ import main


def test_version_is_one_string_everywhere(capsys):
    from importlib.metadata import version
    assert ab.__version__ == version("anebackward")      # pyproject reads _version.py
    assert ab.blas_info()["version"] == ab.__version__
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"anebackward {ab.__version__}"
