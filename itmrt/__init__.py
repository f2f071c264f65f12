"""itmrt: image-text matching models from PyTorch to verified ONNX Runtime / TensorRT deployment.

The top-level package imports nothing heavy: ``import itmrt`` never pulls in torch.
"""

__version__ = "0.1.0"
