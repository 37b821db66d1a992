"""The deployment half: per-device profiles, ONNX export, latency, selection, parity and bundles."""
