"""Seeded mutation fuzzing of the emulated platform's MIL reader and
interpreter, run by tests/test_ane_mil_fuzz.py in a child process (so that a
crash is a reported failure, not a dead test run).

Usage: python tests/ane_mil_fuzz.py SEED SECONDS
Each case mutates a valid program (the dx program the core emits, and a
program using every op) and runs it with the valid program's input. Every
outcome but success or the documented errors (AnebackwardError from the
platform: a malformed program at compile, a surface size mismatch at
evaluate; MemoryError beyond the emulator's size limit) is printed with the
case and ends the process with status 1."""
import random
import sys
import time

import numpy as np

from anebackward import ane
from anebackward.errors import AnebackwardError

DOCUMENTED = ("emulated platform, compile: MIL line", "emulated platform, evaluate:")

OPS = """program(1.3)
{
    func main<ios18>(tensor<fp32, [2, 3, 5]> x) {
        string to16 = const()[name = string("to16"), val = string("fp16")];
        tensor<fp16, [2, 3, 5]> h = cast(dtype = to16, x = x)[name = string("h")];
        tensor<int32, [3]> p = const()[name = string("p"), val = tensor<int32, [3]>([2, 0, 1])];
        tensor<fp16, [5, 2, 3]> t = transpose(perm = p, x = h)[name = string("t")];
        tensor<int32, [3]> b = const()[name = string("b"), val = tensor<int32, [3]>([1, 0, 1])];
        tensor<int32, [3]> s = const()[name = string("s"), val = tensor<int32, [3]>([3, -1, 2])];
        tensor<fp16, [3, 2, 2]> c = slice_by_size(x = t, begin = b, size = s)[name = string("c")];
        tensor<int32, [3]> r = const()[name = string("r"), val = tensor<int32, [3]>([2, 3, 2])];
        tensor<fp16, [2, 3, 2]> m = reshape(shape = r, x = c)[name = string("m")];
        bool f = const()[name = string("f"), val = bool(false)];
        bool tr = const()[name = string("tr"), val = bool(true)];
        tensor<fp16, [2, 3, 3]> y16 = matmul(transpose_x = f, transpose_y = tr, x = m, y = m)[name = string("y16")];
        string to32 = const()[name = string("to32"), val = string("fp32")];
        tensor<fp32, [2, 3, 3]> y = cast(dtype = to32, x = y16)[name = string("y")];
    } -> (y);
}
"""

TOKENS = ["tensor", "<", ">", "[", "]", "(", ")", "{", "}", ",", ";", "=", "->", "fp16", "fp32", "int32",
          "bool", "string", "const", "cast", "slice_by_size", "reshape", "transpose", "matmul", "x", "y",
          "-1", "0", "1", "2147483647", "-2147483648", "99999999999999999999", "65536", "1e9", '"',
          "//", "\n", "val", "name", "program", "func", "main", "\x00", "\xff"]


def mutate(rng, text):
    for _ in range(rng.randint(1, 4)):
        kind = rng.randrange(6)
        i = rng.randrange(len(text) + 1)
        j = min(len(text), i + rng.randint(1, 12))
        if kind == 0:                                   # delete a span
            text = text[:i] + text[j:]
        elif kind == 1:                                 # insert a token
            text = text[:i] + rng.choice(TOKENS) + text[i:]
        elif kind == 2:                                 # replace a number by another
            nums = [k for k in range(len(text)) if text[k].isdigit() and (k == 0 or not text[k - 1].isdigit())]
            if nums:
                k = rng.choice(nums)
                e = k
                while e < len(text) and text[e].isdigit():
                    e += 1
                text = text[:k] + rng.choice(["0", "1", "3", "64", "-1", "-7", "2147483647", "4294967296",
                                             "733583431", str(rng.randint(0, 10 ** 6))]) + text[e:]
        elif kind == 3:                                 # duplicate a line
            lines = text.split("\n")
            k = rng.randrange(len(lines))
            lines.insert(k, lines[k])
            text = "\n".join(lines)
        elif kind == 4:                                 # swap two lines
            lines = text.split("\n")
            a, b = rng.randrange(len(lines)), rng.randrange(len(lines))
            lines[a], lines[b] = lines[b], lines[a]
            text = "\n".join(lines)
        else:                                           # flip one character
            if text:
                k = rng.randrange(len(text))
                text = text[:k] + chr(rng.randrange(32, 127)) + text[k + 1:]
    return text


def main(seed, seconds):
    ane.use_emulator(True)
    ane.configure(max_programs=2 ** 40)      # every case compiles: no budget in a fuzz run
    S, n_in, n_out = 64, 64, 64
    dx = ane.mil_linear_dx(S, n_in, n_out)
    seeds = [(dx, np.zeros((1, n_out, 1, S + n_in), np.float16), (1, S, 1, n_in), np.float16),
             (OPS, np.linspace(-2, 2, 30, dtype=np.float32).reshape(2, 3, 5), (2, 3, 3), np.float32)]
    rng = random.Random(seed)
    end = time.monotonic() + seconds
    cases = ok = errors = 0
    while time.monotonic() < end:
        text, x, shape, dtype = rng.choice(seeds)
        mil = mutate(rng, text)
        cases += 1
        try:
            ane.run_mil(mil, x, shape, dtype)
            ok += 1
        except AnebackwardError as e:
            if not any(d in str(e) for d in DOCUMENTED):
                print(f"undocumented error for case {cases}:\n{mil}\n{e}")
                return 1
            errors += 1
        except MemoryError as e:
            if "emulator's limit" not in str(e):
                print(f"undocumented MemoryError for case {cases}:\n{mil}\n{e}")
                return 1
            errors += 1
        except Exception as e:   # anything else is a defect of the reader
            print(f"unexpected {type(e).__name__} for case {cases}:\n{mil}\n{e}")
            return 1
    print(f"cases={cases} ran={ok} rejected={errors}")
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]), float(sys.argv[2])))
