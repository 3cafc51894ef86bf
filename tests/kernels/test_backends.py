"""The backend contract (backends/base.py): every operation implemented, checked when a backend is built."""

import pytest

from ossie.backends import Backend, TorchBackend
from ossie.backends.base import Backend as Contract


def test_a_backend_that_forgets_an_operation_cannot_be_built():
    ops = {name: getattr(TorchBackend, name) for name in Contract.__abstractmethods__}
    Partial = type("Partial", (Backend,), {"name": "partial", **{k: v for k, v in ops.items() if k != "experts"}})
    with pytest.raises(TypeError, match="experts"):
        Partial()
    type("Whole", (Backend,), {"name": "whole", **ops})()  # all of them: it builds


def test_the_contract_is_every_operation_the_model_calls():
    assert Contract.__abstractmethods__ == {"prepare", "running", "layers", "rms_norm", "linear", "attend",
                                            "attention", "experts"}


@pytest.mark.parametrize("module, cls", [("ossie.backends.cpu", "CpuBackend"), ("ossie.backends.cuda", "CudaBackend")])
def test_ossies_backends_implement_it_without_inheriting_the_reference(module, cls):
    """Where a backend runs an operation as the reference does, it names TorchBackend's on purpose; nothing comes
    from it by inheritance."""
    import importlib

    try:
        backend = getattr(importlib.import_module(module), cls)
    except ImportError as e:  # the cuda backend needs triton
        pytest.skip(str(e))
    assert not issubclass(backend, TorchBackend) and issubclass(backend, Backend)
    assert not backend.__abstractmethods__
