"""Reading Megatron/DeepSpeed ``.pt`` files without running code from them and without Megatron installed.

These files are pickles: besides tensors they hold an ``argparse.Namespace``, numpy RNG state, and objects of
Megatron / DeepSpeed / apex classes (enums, loss scalers). ``torch.load(weights_only=True)`` refuses the Namespace,
and a plain ``weights_only=False`` load both needs those packages and runs whatever the pickle names. Here the
unpickler resolves only an allowlist (tensors and storages, containers, ``argparse.Namespace``, numpy arrays,
dtypes and scalars); classes from ``megatron``, ``deepspeed``, ``apex`` and ``fp16`` modules become inert stubs that
only remember their arguments; anything else - ``os.system``, ``builtins.eval``, any other class - is refused with
its name, before it is called.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from types import SimpleNamespace

import torch

from safeio.terminal import first_line

from .errors import MegatronCheckpointError, UnsafeCheckpointError

__all__ = ["Stub", "load_pt"]

_ALLOWED = {
    ("collections", "OrderedDict"),
    ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"), ("builtins", "complex"),
    ("__builtin__", "set"), ("__builtin__", "frozenset"),
    ("copyreg", "_reconstructor"),  # re-creates an object of a class that itself passed this allowlist
    ("argparse", "Namespace"),
    ("_codecs", "encode"),  # numpy pickles bytes through it (protocol 2)
    ("torch", "Size"), ("torch", "device"),
    ("torch._utils", "_rebuild_tensor"), ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor_v3"),
    ("torch._utils", "_rebuild_parameter"), ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch._tensor", "_rebuild_from_type_v2"), ("torch.nn.parameter", "Parameter"),
    ("torch.storage", "_load_from_bytes"), ("torch", "UntypedStorage"),
}
_NUMPY = {"_reconstruct", "scalar", "ndarray", "dtype"}
_STUBBED_PACKAGES = ("megatron", "deepspeed", "apex", "fp16", "fused_layer_norm_cuda")


class Stub:
    """Stands in for a Megatron/DeepSpeed/apex object: keeps the arguments and state it was built with."""

    _qualname = "Stub"

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __new__(cls, *args, **kwargs):
        instance = super().__new__(cls)
        instance.args, instance.kwargs = args, kwargs
        return instance

    def __setstate__(self, state):
        self.state = state

    @property
    def value(self):
        """An enum member's value (``PositionEmbeddingType(2)`` is pickled as a call with 2)."""
        return self.args[0] if self.args else None

    def __repr__(self):
        return f"<stub {self._qualname}{self.args!r}>"


def _stub_class(module: str, name: str) -> type:
    return type(name, (Stub,), {"__module__": module, "_qualname": f"{module}.{name}"})


def _torch_dtype(name: str):
    value = getattr(torch, name, None)
    return value if isinstance(value, torch.dtype) else None


class _Unpickler(pickle.Unpickler):
    source = "<checkpoint>"

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and (_torch_dtype(name) is not None or name.endswith("Storage")):
            return super().find_class(module, name)
        if module.split(".")[0] == "numpy" and (name in _NUMPY or name.endswith("DType")):
            return super().find_class(module, name)
        if module.split(".")[0] in _STUBBED_PACKAGES:
            return _stub_class(module, name)
        raise UnsafeCheckpointError(
            f"{self.source} asks to load {module}.{name}, which a checkpoint has no reason to hold; refusing to run "
            "it. Convert only checkpoints you trust, saved by Megatron-LM or Megatron-DeepSpeed."
        )


def _pickle_module(source: str) -> SimpleNamespace:
    unpickler = type("Unpickler", (_Unpickler,), {"source": source})

    def load(file, **kwargs):
        return unpickler(file, **kwargs).load()

    return SimpleNamespace(Unpickler=unpickler, load=load, __name__="gptmeg.megatron.unpickle")


def load_pt(path: str | Path):
    """The content of a Megatron/DeepSpeed ``.pt`` file on CPU (memory-mapped where torch allows), through the
    allowlist unpickler."""
    path = Path(path)
    module = _pickle_module(str(path))
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=False, pickle_module=module, mmap=True)
        except RuntimeError as error:
            if "mmap" not in str(error):
                raise
            return torch.load(path, map_location="cpu", weights_only=False, pickle_module=module)
    except UnsafeCheckpointError:
        raise
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, ValueError) as error:
        first = first_line(error)
        raise MegatronCheckpointError(f"{path} cannot be read ({first}); the file is truncated or not a torch "
                                      "checkpoint.") from None
