"""`python bench/run.py [options]` is `anebackward bench [options]`: the suite
and every contender live in the package (anebackward/bench/, see
bench/README.md); this script only calls it."""
import sys

if __name__ == "__main__":
    from anebackward.__main__ import main
    sys.exit(main(["bench"] + sys.argv[1:]))
