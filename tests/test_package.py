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


def _copy_tree_without_core(tmp_path):
    """A source checkout as `pip install .` leaves it: no in-place _lib."""
    import os
    import shutil
    src = os.path.dirname(os.path.dirname(ab.__file__))
    tree = tmp_path / "checkout"
    shutil.copytree(os.path.join(src, "anebackward"), tree / "anebackward",
                    ignore=shutil.ignore_patterns("__pycache__", "_lib*.so", "_lib*.pyd", "_lib.c"))
    (tree / "csrc").mkdir()
    (tree / "setup.py").write_text("")   # what marks a checkout (its content does not matter)
    return tree


@pytest.mark.parametrize("cmd", [["-c", "import anebackward"], ["-m", "anebackward", "train"]])
def test_source_tree_shadowing_says_what_to_do(tmp_path, cmd):
    """Inside a checkout after a non-editable install, the tree shadows the
    install; the error must say so in one line (it was a bare
    ModuleNotFoundError: No module named 'anebackward._lib')."""
    import os
    import subprocess
    import sys
    import sysconfig
    tree = _copy_tree_without_core(tmp_path)
    # -S with site-packages on PYTHONPATH: the dependencies import, but no .pth
    # file runs, so an editable install of this checkout cannot step in
    # (every site-packages this interpreter sees: a venv made with
    # --system-site-packages finds its dependencies in the base one)
    paths = sysconfig.get_paths()
    sites = [p for p in sys.path if os.path.basename(p) in ("site-packages", "dist-packages")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(dict.fromkeys(
        [paths["purelib"], paths["platlib"]] + sites)))
    r = subprocess.run([sys.executable, "-S"] + cmd, cwd=tree, capture_output=True, text=True,
                       timeout=60, env=env)
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: anebackward:") and "pip install -e ." in last, r.stderr
    assert "shadows any installed copy" in last


def test_main_job_draws_loss_png_without_a_display(tmp_path):
    """`pip install . && anebackward train` lists loss.png among its outputs:
    matplotlib is a dependency (it was an extra, so the plot was skipped), and
    the job draws it headless."""
    import os
    import subprocess
    import sys
    from importlib.metadata import requires
    assert any(r.split(";")[0].strip().startswith("matplotlib") and "extra ==" not in r
               for r in requires("anebackward"))
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY",
                                                            "MPLBACKEND")}
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "anebackward", "train", "--config", "tiny",
                        "--steps", "2", "--batch-size", "2", "--seq-len", "16", "--eval-every", "0",
                        "--quiet", "--out", str(out)], capture_output=True, text=True, timeout=120,
                       env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "skipped loss.png" not in r.stdout + r.stderr
    with open(out / "loss.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def _imports():
    """{module: {(imported module, names)}} for every module of the package,
    imports inside functions included."""
    import ast
    import pathlib
    root = pathlib.Path(ab.__file__).parent
    graph = {}
    for path in root.rglob("*.py"):
        rel = path.relative_to(root.parent).with_suffix("")
        parts = list(rel.parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        mod = ".".join(parts)
        base = parts if is_pkg else parts[:-1]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    pkg = base[:len(base) - node.level + 1]
                    target = ".".join(pkg + ([node.module] if node.module else []))
                else:
                    target = node.module
                names = tuple(a.name for a in node.names)
                if target.startswith("anebackward"):
                    if node.module is None:      # from . import x: x is a module
                        edges |= {(f"{target}.{n}", ()) for n in names}
                    else:
                        edges.add((target, names))
            elif isinstance(node, ast.Import):
                edges |= {(a.name, ()) for a in node.names if a.name.startswith("anebackward")}
        graph[mod] = edges
    return graph


def test_no_import_cycle_between_modules():
    """checkpoint <-> model was a cycle; layout, config and atomic writes have
    their own modules now. (Imports of the package root, which re-exports
    everything, are not counted.)"""
    imports = _imports()
    graph = {m: {t for t, _ in e if t in imports and t != "anebackward"} for m, e in imports.items()}
    assert "anebackward.model" not in graph["anebackward.checkpoint"]
    state = {}

    def visit(m, stack):
        state[m] = "open"
        for t in graph.get(m, ()):
            if state.get(t) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack + [t]))
            if t not in state:
                visit(t, stack + [t])
        state[m] = "done"
    for m in graph:
        if m not in state:
            visit(m, [m])


def test_no_private_names_imported_across_modules():
    """e.g. tokenizer used checkpoint._atomic_write. Private modules of the
    package (anebackward._native, _checks) may be imported; private names
    from another module may not."""
    imports = _imports()
    bad = [(m, t, n) for m, edges in imports.items() for t, names in edges for n in names
           if n.startswith("_") and n != "__version__" and f"{t}.{n}" not in imports]
    assert not bad


def test_public_api_is_annotated_and_typed():
    """Type hints on the public API; py.typed and the _lib stub ship with the
    package (pyproject package-data; .ci/wheel checks the wheel holds them)."""
    import inspect
    import os
    root = os.path.dirname(ab.__file__)
    assert os.path.isfile(os.path.join(root, "py.typed"))
    assert os.path.isfile(os.path.join(root, "_lib.pyi"))
    public = [getattr(ab, n) for n in ab.__all__ if inspect.isfunction(getattr(ab, n))]
    for cls in (ab.Llama, ab.AdamW, ab.LlamaConfig):
        public += [f for n, f in vars(cls).items() if inspect.isfunction(f) and
                   (not n.startswith("_") or n == "__init__")]
        public += [f.__func__ for f in vars(cls).values() if isinstance(f, classmethod)]
    assert len(public) > 40
    _assert_annotated(public)


def test_torch_api_is_annotated(torch):
    import inspect
    import anebackward.torch as at
    public = [getattr(at, n) for n in ("linear", "rmsnorm", "rope", "attention", "swiglu",
                                       "classifier_cross_entropy", "precompute_freqs_cis")]
    public += [at.Transformer.forward, at.Transformer.configure_optimizers,
               at.Transformer.estimate_mfu, at.Transformer.generate, at.Transformer.__init__]
    _assert_annotated([inspect.unwrap(f) for f in public])


def _assert_annotated(public):
    import inspect
    for f in public:
        sig = inspect.signature(f)
        missing = [p for p in sig.parameters.values() if p.name not in ("self", "cls") and
                   p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and
                   p.annotation is inspect.Parameter.empty]
        assert not missing, f"{f.__qualname__}: no annotation for {[p.name for p in missing]}"
        assert sig.return_annotation is not inspect.Signature.empty or f.__name__ == "__post_init__", \
            f.__qualname__


def test_hf_extra_pulls_no_torch_and_the_readme_pins_ci_torch():
    """The hf extra holds no requirement that needs torch (accelerate and
    peft require it, and an unpinned torch resolves to PyPI's CUDA wheels);
    the README's CPU-build command pins the torch CI installs (.ci/run, where
    the tree has it: the wheel's test copy has no .ci)."""
    import os
    import re
    root = os.path.join(os.path.dirname(__file__), "..")
    toml = open(os.path.join(root, "pyproject.toml")).read()
    hf = re.search(r"^hf = \[(.*?)\]", toml, re.S | re.M).group(1)
    names = {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower()
             for r in re.findall(r'"([^"]+)"', hf)}
    assert names == {"transformers", "safetensors", "tokenizers"}
    readme = open(os.path.join(root, "README.md")).read()
    pins = re.findall(r"pip install (torch==[0-9.]+) --index-url "
                      r"https://download.pytorch.org/whl/cpu", readme)
    assert pins
    ci_path = os.path.join(root, ".ci", "run")
    if os.path.exists(ci_path):
        ci = open(ci_path).read()
        assert set(pins) == set(re.findall(r"pip install -q (torch==[0-9.]+)", ci))
        assert "install_extra hf-test" in ci


def test_drop_in_without_torch_names_the_cpu_build_to_install():
    import subprocess
    import sys
    code = "import sys; sys.modules['torch'] = None; import anebackward.transformers"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "needs PyTorch" in r.stderr and "download.pytorch.org/whl/cpu" in r.stderr
