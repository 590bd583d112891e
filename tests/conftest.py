"""Shared test fixtures.

torch is a test-only oracle. Without it the torch tests skip — unless
ANEBACKWARD_REQUIRE_TORCH=1 (CI), which turns the skip into a failure.
"""
import contextlib
import os

import numpy as np
import pytest


def import_torch():
    try:
        import torch
    except ImportError as e:
        if os.environ.get("ANEBACKWARD_REQUIRE_TORCH") == "1":
            pytest.fail(f"ANEBACKWARD_REQUIRE_TORCH=1 but torch cannot be imported: {e}")
        pytest.skip("torch is not installed (pip install torch==2.13.0 to run the oracle tests)")
    return torch


@pytest.fixture
def torch():
    return import_torch()


def import_safetensors():
    """safetensors alone (the `hf` extra's file format, what the HF directory
    readers need); required, not skipped, when ANEBACKWARD_REQUIRE_HF=1."""
    try:
        import safetensors
    except ImportError as e:
        if os.environ.get("ANEBACKWARD_REQUIRE_HF") == "1":
            pytest.fail(f"ANEBACKWARD_REQUIRE_HF=1 but safetensors cannot be imported: {e}")
        pytest.skip("safetensors is not installed (pip install -e '.[hf]'): the Hugging Face "
                    "directory readers are not tested here")
    return safetensors


def import_hf():
    """transformers + safetensors (the `hf` extra): the oracle of the Hugging
    Face tests; required, not skipped, when ANEBACKWARD_REQUIRE_HF=1 (CI) or
    ANEBACKWARD_REQUIRE_TORCH=1 (a missing oracle must fail, not skip)."""
    import_torch()
    try:
        import safetensors  # noqa: F401
        import transformers
    except ImportError as e:
        if "1" in (os.environ.get("ANEBACKWARD_REQUIRE_HF"), os.environ.get("ANEBACKWARD_REQUIRE_TORCH")):
            pytest.fail(f"ANEBACKWARD_REQUIRE_HF/ANEBACKWARD_REQUIRE_TORCH=1 but the hf extra "
                        f"cannot be imported: {e}")
        pytest.skip("transformers/safetensors are not installed (pip install -e '.[hf]')")
    return transformers


def import_hf_test(name):
    """A module of the `hf-test` extra (accelerate for HF Trainer, peft):
    the other oracles of the Hugging Face tests; required like transformers."""
    import importlib
    import_hf()
    try:
        return importlib.import_module(name)
    except ImportError as e:
        if "1" in (os.environ.get("ANEBACKWARD_REQUIRE_HF"), os.environ.get("ANEBACKWARD_REQUIRE_TORCH")):
            pytest.fail(f"ANEBACKWARD_REQUIRE_HF/ANEBACKWARD_REQUIRE_TORCH=1 but {name} "
                        f"(the hf-test extra) cannot be imported: {e}")
        pytest.skip(f"{name} is not installed (pip install -e '.[hf-test]'): the tests "
                    f"that need it are not run here")


@pytest.fixture(scope="module")
def hf():
    """transformers (the hf extra), imported as import_hf() says."""
    return import_hf()


@pytest.fixture
def abt(hf):
    """anebackward.transformers (the drop-in; needs transformers)."""
    import anebackward.transformers as abt
    return abt


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def assert_bit_identical_at_threads(step, settings):
    """step(setting) -> (loss, flat gradients), run at
    anebackward.set_num_threads(setting[0]) for each setting (the thread
    count restored afterwards): every loss and gradient bit-identical."""
    import anebackward
    before, results = anebackward.get_num_threads(), []
    try:
        for setting in settings:
            anebackward.set_num_threads(setting[0])
            results.append(step(setting))
    finally:
        anebackward.set_num_threads(before)
    for loss, grads in results[1:]:
        assert loss == results[0][0]
        assert np.array_equal(grads, results[0][1])


@contextlib.contextmanager
def bf16_runnable():
    """precision="bf16" can run inside: on oneDNN where it loads, else on the
    portable path (it needs no library), set for the block only.
    ANEBACKWARD_REQUIRE_BF16=1 (CI, with the [bf16] extra) makes a missing
    oneDNN a failure instead."""
    from anebackward import bf16
    before = bf16.get_mode()["path"]
    if bf16.path() == "unavailable":
        if os.environ.get("ANEBACKWARD_REQUIRE_BF16") == "1":
            raise RuntimeError(f"ANEBACKWARD_REQUIRE_BF16=1 but {bf16.describe()}")
        bf16.set_mode(path="portable")
    try:
        yield
    finally:
        bf16.set_mode(path=before)


@pytest.fixture
def bf16_ready():
    """bf16 runs in this test (bf16_runnable)."""
    with bf16_runnable():
        yield


@pytest.fixture
def keep_blas_threads():
    """anebackward.torch.Transformer(blas_threads="auto") sets the
    process-wide OpenBLAS thread count; put it back afterwards so other test
    modules see what they expect."""
    import anebackward
    n = anebackward.get_num_threads()
    yield
    if n > 0:
        anebackward.set_num_threads(n)


@contextlib.contextmanager
def ane_platform(monkeypatch, emulated):
    """anebackward.ane with its state reset and the whole compile budget, on
    the emulated platform (True), the native one only (False) or the one the
    environment would choose (None); the settings, the platform choice and
    the emulator's work directory restored afterwards."""
    from anebackward import ane
    from anebackward._native import ffi, lib
    monkeypatch.delenv("ANEBACKWARD_ANE", raising=False)
    monkeypatch.delenv("ANEBACKWARD_BACKEND", raising=False)
    ane.reset()
    lib.ab_ane_testing_set_process_compiles(0)
    prev = ane.use_emulator(emulated)
    saved = ane.configure()
    try:
        yield ane
    finally:
        ane.configure(**saved)
        ane.use_emulator(prev)
        lib.ab_ane_emulated_workdir(ffi.NULL)
        ane.reset()


@pytest.fixture
def emulator(monkeypatch):
    """The emulated ANE platform for one test (ane_platform)."""
    with ane_platform(monkeypatch, True) as ane:
        yield ane
