"""Test-only memo of ONNX exports and precision conversions across pipeline runs.

Every pipeline test exports the same tiny checkpoint; the dynamo exporter takes seconds per graph
on a small machine, so the tests share one file per (depth, exits, opset, multi-exit) and per
(source file, precision, preset). The exporter and converter themselves are tested in
test_export.py / test_quantize.py, and every pipeline run still checks parity of what it gets.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

_EXPORTS: dict[str, Path] = {}
_CONVERSIONS: dict[str, tuple[Path, object]] = {}


def _digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def memoize_exports(monkeypatch, store: Path) -> None:
    import bim_export.deploy.export as export
    import bim_export.deploy.quantize as quantize

    real_export, real_convert = export.export_onnx, quantize.convert_precision

    def export_onnx(backbone, path, *, opset, img_size, metadata=None, multi_exit=False, exits=None):
        key = json.dumps([sorted((metadata or {}).items()), opset, img_size, multi_exit,
                          sorted(exits) if exits else None, sum(p.numel() for p in backbone.parameters()),
                          float(sum(p.detach().double().sum() for p in backbone.parameters()))])
        if key not in _EXPORTS:
            kept = store / f"export-{len(_EXPORTS)}.onnx"
            real_export(backbone, kept, opset=opset, img_size=img_size, metadata=metadata,
                        multi_exit=multi_exit, exits=exits)
            _EXPORTS[key] = kept
        shutil.copyfile(_EXPORTS[key], path)
        return Path(path)

    def convert_precision(fp32_path, out_path, precision, calib_x=None, method=None, preset=None, **kw):
        key = json.dumps([_digest(fp32_path), precision, method, preset, sorted(kw.items())])
        if key not in _CONVERSIONS:
            kept = store / f"convert-{len(_CONVERSIONS)}.onnx"
            info = real_convert(fp32_path, kept, precision, calib_x=calib_x, method=method, preset=preset, **kw)
            _CONVERSIONS[key] = (kept, info)
        kept, info = _CONVERSIONS[key]
        shutil.copyfile(kept, out_path)
        return info

    monkeypatch.setattr(export, "export_onnx", export_onnx)
    monkeypatch.setattr(quantize, "convert_precision", convert_precision)
