"""Run the benchmark suite from a source checkout: `python bench/run.py [options]`
is `python -m anebackward bench [options]` (see bench/README.md)."""
import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("ANEBACKWARD_BENCH_DIR", os.path.dirname(os.path.abspath(__file__)))
    from anebackward.__main__ import main
    sys.argv = [sys.argv[0], "bench"] + sys.argv[1:]
    sys.exit(main())
