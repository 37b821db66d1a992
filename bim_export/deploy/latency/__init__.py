"""Latency of an ONNX graph on a device; each module imports only those listed before it.

    costmodel    FLOPs and bytes per ONNX node, peak memory (onnx + numpy)
    stats        statistics of disturbed measurements: median across rounds, errors (pure Python)
    measure      ONNX Runtime timing in a worker process (worker), LatencyResult
    roofline     a device's figures (Hardware.from_profile), efficiency factors, nodes summed (CPU) or
                 queued behind their launches (GPU), the fit
    calibration  a device's own fit, written once on the device and read by every prediction
    predict      predicted (or, for a measured profile, measured) latency for a profile
"""
