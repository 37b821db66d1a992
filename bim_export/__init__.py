"""bim-export: block-wise masked image modeling for timm ViTs, exported per device to ONNX."""

__version__ = "0.1.0"
