"""A server-gpu bundle served over HTTP (``infer.py --serve``), on loopback.

The servers run the bundle's own infer.py in a subprocess, started from bundles the export pipeline
wrote, and are stopped at the end; every answer is checked against a direct onnxruntime run of the
same image. The queue's refusal (503) is tested in-process, where the model can be held busy.
"""

from __future__ import annotations

import base64
import http.client
import json
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import yaml
from finetuned import make_finetuned
from PIL import Image

from bim_export.core.resources import resource_dir, sample_images_dir
from bim_export.deploy.pipeline import run_export
from bim_export.runtime.batcher import MicroBatcher
from bim_export.runtime.labels import softmax
from bim_export.runtime.preprocess import preprocess

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

LABELS = ("cat", "dog", "fish")
THREADS, PER_THREAD = 8, 25


pytestmark = pytest.mark.usefixtures("shared_exports")  # exports memoized across the module


def _export(checkpoint: Path, tmp: Path) -> Path:
    """The server-gpu profile's bundle (its batch, 32), fp32 only to keep the test short."""
    data = yaml.safe_load((resource_dir("profiles") / "h100-sxm.yaml").read_text())
    data["precisions"] = ["fp32"]
    (tmp / "gpu.yaml").write_text(yaml.safe_dump(data))
    run_export(str(tmp / "gpu.yaml"), checkpoint, tmp / "exports")
    return tmp / "exports" / "gpu"


@pytest.fixture(scope="module")
def backbone(tiny_checkpoint, tmp_path_factory) -> Path:
    return _export(tiny_checkpoint, tmp_path_factory.mktemp("serve-backbone"))


@pytest.fixture(scope="module")
def classifier(tiny_checkpoint, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("serve-classifier")
    return _export(make_finetuned(tmp / "ft", "joint", LABELS, source=tiny_checkpoint), tmp)


@pytest.fixture(scope="module")
def photos() -> list[Path]:
    return sorted(sample_images_dir().rglob("*.jpg"))[:40]


def _direct(bundle: Path, photos: list[Path], output: str) -> np.ndarray:
    """``output`` of each photo, preprocessed as infer.py does, run one at a time by onnxruntime."""
    import onnxruntime as ort

    pre = json.loads((bundle / "manifest.json").read_text())["preprocessing"]
    sess = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run([output], {"pixels": preprocess(Image.open(p).convert("RGB"), pre["img_size"],
                                                                      pre["mean"], pre["std"])[None]})[0]
                           for p in photos])


@contextmanager
def _server(bundle: Path, *flags) -> Iterator[str]:
    """The bundle's infer.py --serve on a free loopback port; yields its base URL, stops it at the end."""
    proc = subprocess.Popen([sys.executable, str(bundle / "infer.py"), "--serve", "--port", "0", *map(str, flags)],
                            cwd=bundle, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving: http://127.0.0.1:"), (line, proc.poll() is not None and proc.stderr.read())
        yield line.split()[1]
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    # uvicorn finishes the requests in flight, then re-raises the signal: the parent sees SIGTERM
    assert proc.returncode in (0, -signal.SIGTERM) and "Traceback" not in err, err


def _call(url: str, body: bytes | None = None, content_type: str | None = None, query: str = "") -> tuple[int, dict]:
    """GET (no body) or POST ``body`` with exactly the Content-Type given (none when None)."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        conn.request("POST" if body is not None else "GET", parts.path + query, body=body,
                     headers={"Content-Type": content_type} if content_type else {})
        response = conn.getresponse()
        text = response.read().decode()
    finally:
        conn.close()
    if response.status >= 400:
        assert "\n" not in text.strip(), text  # one line of JSON
    return response.status, json.loads(text)


def test_concurrent_clients_get_their_own_embeddings_in_batches(backbone, photos):
    ref = _direct(backbone, photos, "embedding")
    jobs = [(t, (t * 7 + i) % len(photos)) for t in range(THREADS) for i in range(PER_THREAD)]
    with _server(backbone, "--max-wait-ms", 20) as url:
        def client(t: int) -> list[tuple[int, int, dict]]:
            return [(i, *_call(url + "/v1/infer", photos[i].read_bytes(), "image/jpeg")) for tt, i in jobs if tt == t]

        with ThreadPoolExecutor(THREADS) as pool:
            answers = [a for part in pool.map(client, range(THREADS)) for a in part]
        status, model = _call(url + "/v1/model")
    assert len(answers) == THREADS * PER_THREAD and {s for _, s, _ in answers} == {200}
    for i, _, body in answers:
        emb = np.asarray(body["embedding"], dtype=np.float32)
        np.testing.assert_allclose(emb, ref[i], rtol=1e-4, atol=1e-4)
        assert int(np.argmin(np.abs(ref - emb).max(axis=1))) == i  # its own photo's, no other's
        assert body["dim"] == ref.shape[1] and 1 <= body["batch"] <= 32
    batching = model["batching"]
    assert status == 200 and model["kind"] == "embedding" and batching["max_batch"] == 32
    assert batching["requests"] == THREADS * PER_THREAD and batching["refused"] == batching["failed"] == 0
    sizes = {int(k): v for k, v in batching["batches"].items()}
    assert max(sizes) > 1, sizes  # concurrent requests shared batches
    assert sum(k * v for k, v in sizes.items()) == THREADS * PER_THREAD
    assert max(b["batch"] for _, _, b in answers) == max(sizes)


def test_classifier_answers_top_k_labels_with_probabilities(classifier, photos):
    picks = photos[:6]
    logits, emb = _direct(classifier, picks, "logits"), _direct(classifier, picks, "embedding")
    with _server(classifier) as url:
        with ThreadPoolExecutor(3) as pool:
            answers = list(pool.map(lambda p: _call(url + "/v1/infer", p.read_bytes(), "image/jpeg", "?top_k=2"),
                                    picks))
        doc = {"image": base64.b64encode(picks[0].read_bytes()).decode(), "output": "embedding"}
        status, as_json = _call(url + "/v1/infer", json.dumps(doc).encode(), "application/json")
        _, model = _call(url + "/v1/model")
    probs = softmax(logits)
    for (code, body), row in zip(answers, probs):
        order = np.argsort(-row, kind="stable")[:2]
        assert code == 200 and [a["label"] for a in body["labels"]] == [LABELS[j] for j in order]
        np.testing.assert_allclose([a["probability"] for a in body["labels"]], row[order], atol=1e-5)
    assert status == 200 and as_json["dim"] == emb.shape[1]
    np.testing.assert_allclose(as_json["embedding"], emb[0], rtol=1e-4, atol=1e-4)
    assert model["kind"] == "classifier" and model["labels"] == list(LABELS)


def _png_header(side: int) -> bytes:
    from conftest import write_png_bomb

    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        return write_png_bomb(Path(tmp) / "big.png", side).read_bytes()


def test_bad_requests_get_a_4xx_with_one_line_and_the_server_goes_on(backbone, photos):
    good = photos[0].read_bytes()
    b64 = base64.b64encode(good).decode()
    bad = [
        (415, "content type 'text/plain'", good, "text/plain", ""),
        (415, "content type '(none)'", good, None, ""),
        (415, "not an image format", b"%PDF-1.4 not an image at all", "image/jpeg", ""),
        (400, "image could not be decoded", good[:len(good) // 2], "image/jpeg", ""),
        (413, "image of 1500x1500 pixels is over the limit of 1000000", _png_header(1500), "image/png", ""),
        (413, "image too large", _png_header(20000), "image/png", ""),
        (413, "over the limit of 262144 bytes", good + bytes(300_000), "image/jpeg", ""),
        (400, "empty image", b"", "image/jpeg", ""),
        (400, "body is not valid JSON", b"{image:", "application/json", ""),
        (400, "image is not valid base64", b'{"image": "not base64!"}', "application/json", ""),
        (400, "unknown key 'colour'", json.dumps({"image": b64, "colour": 1}).encode(), "application/json", ""),
        (400, "top_k must be an integer >= 1 (got '0')", good, "image/jpeg", "?top_k=0"),
        (400, "top_k must be an integer >= 1 (got 'many')", good, "image/jpeg", "?top_k=many"),
        (400, "output 'labels': this model is not a classifier", good, "image/jpeg", "?output=labels"),
        (400, "unknown parameter 'size'", good, "image/jpeg", "?size=3"),
    ]
    ref = _direct(backbone, photos[:1], "embedding")[0]
    with _server(backbone, "--max-body-mb", 0.25, "--max-pixels", 1_000_000) as url:
        for status, reason, body, content_type, query in bad:
            code, answer = _call(url + "/v1/infer", body, content_type, query)
            assert (code, list(answer)) == (status, ["error"]) and reason in answer["error"], (reason, answer)
            assert _call(url + "/health") == (200, {"status": "ok"})  # still up
        assert _call(url + "/v1/nothing")[0] == 404
        code, answer = _call(url + "/v1/infer", json.dumps({"image": b64}).encode(), "application/json")
        _, model = _call(url + "/v1/model")
    assert code == 200
    np.testing.assert_allclose(answer["embedding"], ref, rtol=1e-4, atol=1e-4)
    assert model["batching"]["requests"] == 1 and model["batching"]["failed"] == 0


def test_serving_without_the_framework_is_one_error_line_naming_pip(backbone):
    code = ("import runpy, sys; sys.modules['uvicorn'] = None; sys.argv = ['infer.py', '--serve']; "
            "sys.path.insert(0, '.'); runpy.run_path('infer.py', run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", code], cwd=backbone, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and done.stdout == ""
    assert done.stderr.strip() == "error: serving needs uvicorn, not installed here: pip install starlette uvicorn"


# --------------------------------------------------------------------------------- the batcher


def test_batcher_fills_a_fixed_batch_and_keeps_rows_apart():
    seen = []

    def run(x):
        seen.append(x.shape[0])
        return [x.reshape(len(x), -1).sum(1), x[:, 0, 0, 0] * 2]

    batcher = MicroBatcher(run, batch=4, max_wait_ms=200, fixed_batch=4)
    futures = [batcher.submit(np.full((3, 2, 2), i, np.float32)) for i in range(3)]
    results = [f.result(timeout=10) for f in futures]
    batcher.close()
    assert seen == [4]  # three requests, filled up to the model's fixed batch
    got = [(float(r.outputs[0]), float(r.outputs[1]), r.batch) for r in results]
    assert got == [(12 * i, 2 * i, 3) for i in range(3)]
    stats = batcher.stats()
    assert stats["batches"] == {"3": 1} and list(stats["run_ms"]) == ["3"] and stats["run_ms"]["3"] > 0


def test_full_queue_answers_503_and_a_failed_batch_500_without_stopping(backbone):
    import uvicorn

    from bim_export.runtime.serve import Limits, ServedModel, bind, build_app

    release, started, fail = threading.Event(), threading.Event(), threading.Event()

    def run(x):  # a model the test holds busy, or makes fail
        started.set()
        release.wait(30)
        if fail.is_set():
            raise RuntimeError("out of memory")
        return [x.reshape(len(x), -1)[:, :4]]

    manifest = json.loads((backbone / "manifest.json").read_text())
    batcher = MicroBatcher(run, batch=1, max_wait_ms=0, queue_size=1)
    model = ServedModel(manifest, ["embedding"], batcher, Limits())
    sock = bind("127.0.0.1", 0)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(build_app(model), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    image = next(sample_images_dir().rglob("*.jpg")).read_bytes()
    try:
        while not server.started:
            time.sleep(0.01)
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(_call, url + "/v1/infer", image, "image/jpeg")
            assert started.wait(30)  # the worker holds the first request
            second = pool.submit(_call, url + "/v1/infer", image, "image/jpeg")
            while batcher.stats()["queued"] < 1:  # the second waits in the queue of one
                time.sleep(0.01)
            code, answer = _call(url + "/v1/infer", image, "image/jpeg")
            assert (code, answer) == (503, {"error": "server busy: 1 requests already queued"})
            release.set()
            assert first.result(30)[0] == second.result(30)[0] == 200
        fail.set()
        assert _call(url + "/v1/infer", image, "image/jpeg") == (
            500, {"error": "inference failed: RuntimeError: out of memory"})
        fail.clear()
        assert _call(url + "/v1/infer", image, "image/jpeg")[0] == 200
        stats = _call(url + "/v1/model")[1]["batching"]
        assert (stats["requests"], stats["refused"], stats["failed"]) == (3, 1, 1)
    finally:
        release.set()
        server.should_exit = True
        thread.join(30)
        batcher.close()
        sock.close()


def test_the_listening_socket_is_tcp_and_a_taken_port_is_one_error():
    """asyncio turns Nagle's algorithm off only on sockets that say they are TCP; with it on, each
    keep-alive answer waited 40 ms for the client's delayed ACK."""
    import socket

    from bim_export.runtime.errors import InputError
    from bim_export.runtime.serve import bind

    sock = bind("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP
        port = sock.getsockname()[1]
        with pytest.raises(InputError, match=f"--host 127.0.0.1 --port {port}: cannot listen there: "):
            bind("127.0.0.1", port)
    finally:
        sock.close()


def test_the_report_says_how_to_serve(backbone):
    report = (backbone / "report.md").read_text()
    assert "`python infer.py --serve --port 8000`" in report and "`pip install starlette uvicorn`" in report
