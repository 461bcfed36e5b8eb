"""Is TensorRT usable here? One sentence when it is not, naming what is missing and the fallback."""

from __future__ import annotations

from ..errors import EngineError
from .cache import GpuInfo

__all__ = ["TensorRTUnavailable", "load_tensorrt", "current_gpu", "INSTALL_HINT"]

INSTALL_HINT = "pip install --extra-index-url https://pypi.nvidia.com '.[tensorrt]'"
FALLBACK = "onnxruntime is the fallback (engines: --backend onnxruntime; validate: --backends onnxruntime)"


class TensorRTUnavailable(EngineError):
    pass


def load_tensorrt():
    """The ``tensorrt`` module, once TensorRT >= 10 and a CUDA GPU are both present."""
    try:
        import tensorrt as trt
    except ImportError:
        raise TensorRTUnavailable(
            f"TensorRT is not installed ({INSTALL_HINT} on a machine with an NVIDIA GPU); {FALLBACK}."
        ) from None
    except Exception as error:  # noqa: BLE001 - a broken install raises anything from its native loader
        raise TensorRTUnavailable(f"TensorRT is installed but fails to load ({error}); {FALLBACK}.") from None
    major = int(str(trt.__version__).split(".")[0])
    if major < 10:
        raise TensorRTUnavailable(f"TensorRT {trt.__version__} is too old: strongly typed networks need TensorRT "
                                  f">= 10 ({INSTALL_HINT}); {FALLBACK}.")
    import torch

    if not torch.cuda.is_available():
        raise TensorRTUnavailable(f"TensorRT needs an NVIDIA GPU and torch sees no CUDA device; {FALLBACK}.")
    return trt


def current_gpu(trt) -> GpuInfo:
    import torch

    major, minor = torch.cuda.get_device_capability()
    return GpuInfo(name=torch.cuda.get_device_name(), compute_capability=f"{major}.{minor}",
                   tensorrt=str(trt.__version__))
