"""The device runtime: what a bundle runs without torch (the standard library, numpy, onnxruntime, Pillow).

Its modules import only each other, by relative imports, so this folder works both as
``bim_export.runtime`` and as the ``runtime/`` package a bundle ships beside its scripts.
"""
