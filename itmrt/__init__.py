"""itmrt: image-text matching models from PyTorch to verified ONNX Runtime / TensorRT deployment.

The top-level package imports nothing heavy: ``import itmrt`` never pulls in torch.
"""

__version__ = "0.1.0"


def __getattr__(name: str):  # type: ignore[no-untyped-def]
    """``itmrt.load`` imports the runtime (numpy + onnxruntime) on first use, not with ``import itmrt``;
    ``itmrt.RuntimeOptions`` is the group of options it takes."""
    if name in ("load", "RuntimeOptions"):
        from itmrt import runtime

        return getattr(runtime, name)
    raise AttributeError(f"module 'itmrt' has no attribute {name!r}")
