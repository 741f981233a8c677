"""``masm serve`` (issue 20): the API in process, the bad-input corpus and a load test against a real
``masm serve`` on loopback, and the web page in headless Chromium.

The model is the quick demo's detector as ``masm demo --quick`` builds it (untrained adapters: what is
tested here does not depend on what the weights learned).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import os
import re
import shutil
import socket
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from data_fixtures import astronaut_frames, write_video
from masm.benchmarks.serve import load, multipart_body, quick_demo_detector, random_pngs, running_server
from masm.inference import RESULT_KEYS, Scorer, ScorerOptions
from masm.serve import ServeOptions, create_app
from masm.serve.batching import Batcher
from test_inference_detect import build_inputs, face_detector

# Limits of the real server, small enough that the tests can cross them cheaply.
SERVER_ARGS = ["--max-upload-mb", "2", "--max-video-frames", "20", "--timeout-s", "30"]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    # MASM_SERVE_TEST_MODEL: a trained quick-demo detector instead (how the README's screenshot was made).
    if os.environ.get("MASM_SERVE_TEST_MODEL"):
        return Path(os.environ["MASM_SERVE_TEST_MODEL"])
    return quick_demo_detector(tmp_path_factory.mktemp("serve") / "model")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[dict[str, Path], dict[str, Path]]:
    """The good and bad inputs of the ``masm detect`` tests, plus a video over the server's frame limit."""
    import skimage.data

    root = tmp_path_factory.mktemp("corpus")
    good, bad = build_inputs(root, skimage.data.astronaut())
    rng = np.random.default_rng(1)
    frames = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(30)]
    bad["long_video"] = write_video(root / "bad" / "long.mp4", frames)
    return good, bad


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    """A real ``masm serve`` process on 127.0.0.1 and a free port."""
    log = tmp_path_factory.mktemp("server") / "serve.log"
    with running_server(model, SERVER_ARGS, log_path=log) as url:
        yield url
    text = log.read_text()
    assert "Traceback" not in text, text[-3000:]


def png_bytes(size: int = 80, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def assert_one_line_reason(response, fragment: str = "") -> str:
    body = response.json()
    reason = body["error"]
    assert isinstance(reason, str) and reason and "\n" not in reason, body
    assert "Traceback" not in response.text and "masm-serve-" not in reason, body  # no server path leaks
    assert fragment.lower() in reason.lower(), (fragment, body)
    return reason


def assert_healthy(client, good_png: bytes) -> None:
    assert client.get("/health").json()["status"] == "ok"
    response = client.post("/v1/detect", files={"file": ("ok.png", good_png)})
    assert response.status_code == 200 and response.json()["score"] is not None, response.text


# -- the API, in process --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(model):
    with TestClient(create_app(model, ServeOptions())) as c:
        yield c


def test_detect_answers_the_json_of_masm_detect(client, model, corpus, tmp_path):
    good, _ = corpus
    scorer = Scorer(model, ScorerOptions(per_frame=True, frames=16))
    expected = {r["input"]: r for r in scorer.score_paths([str(good["rgb"]), str(good["video"])])}

    image = client.post("/v1/detect", files={"file": ("rgb.png", good["rgb"].read_bytes(), "image/png")})
    assert image.status_code == 200, image.text
    r = image.json()
    assert set(RESULT_KEYS) <= set(r) and r["input"] == "rgb.png" and r["kind"] == "image"
    # The demo model scores whole images: faces are not looked for.
    assert r["error"] is None and r["faces"] is None and r["frames"] == 1
    assert r["score"] == pytest.approx(expected[str(good["rgb"])]["score"], abs=1e-5)
    assert r["label"] == ("fake" if r["score"] >= 0.5 else "real")

    # A video, sent as raw bytes under an image's name: judged by content, scored frame by frame.
    video = client.post(
        "/v1/detect", content=good["video"].read_bytes(), headers={"Content-Type": "application/octet-stream"}
    )
    assert video.status_code == 200, video.text
    v = video.json()
    assert v["kind"] == "video" and v["frames"] == 6 and v["input"] == "upload"
    assert [f["frame"] for f in v["frame_scores"]] == [0, 1, 2, 3, 4, 5]
    want = expected[str(good["video"])]
    assert v["score"] == pytest.approx(want["score"], abs=1e-5)
    assert [f["score"] for f in v["frame_scores"]] == pytest.approx(
        [f["score"] for f in want["frame_scores"]]
    )

    # Every image mode the detect tests score is scored here too, whatever its name says.
    for name in ("gray16", "palette", "rgba", "gray", "cmyk", "noext", "face"):
        response = client.post("/v1/detect", files={"file": ("x.mp4", good[name].read_bytes())})
        assert response.status_code == 200 and response.json()["kind"] == "image", (name, response.text)


def test_client_filename_is_a_label_never_a_path(client, tmp_path):
    service = client.app.state.service
    target = tmp_path / "planted.png"
    name = f"../../../../{target}"
    response = client.post("/v1/detect", files={"file": (name, png_bytes())})
    assert response.status_code == 200 and response.json()["input"] == "planted.png"
    assert not target.exists()
    assert service.folder.files() == []  # the upload was removed after the answer
    assert (service.folder.path.stat().st_mode & 0o777) == 0o700


def test_explanation_maps_come_with_explain_true(client, corpus):
    good, _ = corpus
    response = client.post("/v1/detect?explain=true", files={"file": ("v.mp4", good["video"].read_bytes())})
    assert response.status_code == 200, response.text
    r = response.json()
    assert [m["frame"] for m in r["explanation"]] == [f["frame"] for f in r["frame_scores"]]
    for item, frame in zip(r["explanation"], r["frame_scores"]):
        assert item["score"] == pytest.approx(frame["score"])
        assert item["map"].startswith("data:image/png;base64,")
    png = Image.open(io.BytesIO(base64.b64decode(r["explanation"][0]["map"].split(",", 1)[1])))
    assert png.size == (64, 64)  # the crop the model saw


def test_model_health_openapi_and_page(client, model):
    info = client.get("/v1/model").json()
    assert info["backbone"] == "demo-clip" and info["method"] == "masm" and info["faces"] is False
    assert info["preprocessing"]["input_size"] == 64 and info["preprocessing"]["face_crop"] is None
    assert info["checksum"] == "sha256:" + hashlib.sha256((model / "config.json").read_bytes()).hexdigest()
    assert set(info["files"]) == {"model.safetensors"}
    assert client.get("/health").json()["status"] == "ok"
    schema = client.get("/openapi.json").json()
    assert {"/v1/detect", "/v1/model", "/health"} <= set(schema["paths"])
    assert "multipart/form-data" in schema["paths"]["/v1/detect"]["post"]["requestBody"]["content"]

    # The page and the OpenAPI page load nothing from elsewhere.
    page = client.get("/")
    assert page.status_code == 200 and "default-src 'self'" in page.headers["content-security-policy"]
    docs = client.get("/docs")
    assert docs.status_code == 200
    for html in (page.text, docs.text):
        refs = re.findall(r"""(?:src|href)=["']([^"']+)""", html)
        assert refs and all(ref.startswith("/") for ref in refs), refs
        for ref in refs:
            assert client.get(ref).status_code == 200, ref
    script = client.get("/page/page.js").text
    assert "http://" not in script.replace("http://www.w3.org/2000/svg", "") and "https://" not in script


def test_api_key_guards_every_v1_route(model):
    with TestClient(create_app(model, ServeOptions(api_key="s3cret"))) as c:
        assert c.get("/v1/model").status_code == 401
        assert_one_line_reason(c.post("/v1/detect", files={"file": ("a.png", png_bytes())}), "API key")
        assert c.get("/v1/model", headers={"X-API-Key": "wrong"}).status_code == 401
        assert c.get("/v1/model", headers={"X-API-Key": "s3cret"}).status_code == 200
        ok = c.post(
            "/v1/detect", files={"file": ("a.png", png_bytes())}, headers={"Authorization": "Bearer s3cret"}
        )
        assert ok.status_code == 200
        assert c.get("/health").status_code == 200 and c.get("/").status_code == 200


def test_busy_service_answers_503_with_retry_after(model):
    with TestClient(create_app(model, ServeOptions(max_queue=1))) as c:
        batcher = c.app.state.service.batcher
        with batcher.admit():  # one request in progress takes the only slot
            response = c.post("/v1/detect", files={"file": ("a.png", png_bytes())})
            assert response.status_code == 503 and int(response.headers["Retry-After"]) >= 1
            assert_one_line_reason(response, "busy")
        assert c.post("/v1/detect", files={"file": ("a.png", png_bytes())}).status_code == 200


def test_a_request_over_the_time_limit_gets_408_and_the_service_goes_on(model, monkeypatch):
    with TestClient(create_app(model, ServeOptions(timeout_s=0.3))) as c:
        service = c.app.state.service
        prepare = service._prepare
        monkeypatch.setattr(service, "_prepare", lambda item: time.sleep(1.0) or prepare(item))
        response = c.post("/v1/detect", files={"file": ("slow.png", png_bytes())})
        assert response.status_code == 408
        assert_one_line_reason(response, "within the limit of 0.3 s")
        monkeypatch.setattr(service, "_prepare", prepare)
        time.sleep(1.0)  # the abandoned decode finishes in its thread
        assert_healthy(c, png_bytes())
        assert service.folder.files() == []


def test_batcher_scores_requests_that_arrive_together_in_one_batch():
    import torch

    sizes = []

    def score(batch):
        sizes.append(len(batch))
        return batch[:, 0, 0, 0]  # each crop's own marker, so answers can be matched to requests

    batcher = Batcher(score, max_batch=32, window_s=0.5, max_queue=16)

    async def requests(counts: list[int]) -> list[list[float]]:
        admissions = [batcher.admit() for _ in counts]  # all admitted: the batch waits for all of them

        async def one(i, admission, count):
            with admission:
                await asyncio.sleep(0.01 * i)
                crops = [torch.full((3, 2, 2), float(10 * i + k)) for k in range(count)]
                return await batcher.score(admission, crops)

        return await asyncio.gather(*(one(i, a, n) for i, (a, n) in enumerate(zip(admissions, counts))))

    try:
        answers = asyncio.run(requests([1, 3, 2, 1]))
        assert sizes == [7]
        assert answers == [[0.0], [10.0, 11.0, 12.0], [20.0, 21.0], [30.0]]
        # A lone request does not wait for the window: nothing else is on its way.
        start = time.perf_counter()
        assert asyncio.run(requests([2])) == [[0.0, 1.0]]
        assert time.perf_counter() - start < 0.25 and sizes[-1] == 2
        # More crops than the maximum batch: split into forward passes of at most max_batch.
        assert len(asyncio.run(requests([40]))[0]) == 40 and sizes[-2:] == [32, 8]
    finally:
        batcher.close()


def test_a_face_model_finds_and_scores_faces_like_masm_detect(tmp_path, corpus):
    from masm.models import save_checkpoint

    good, _ = corpus
    checkpoint = save_checkpoint(face_detector(), tmp_path / "face-model")
    (want,) = Scorer(checkpoint).score_paths([str(good["face"])])
    with TestClient(create_app(checkpoint, ServeOptions())) as c:
        assert c.get("/v1/model").json()["faces"] is True
        response = c.post("/v1/detect", files={"file": ("astronaut.jpg", good["face"].read_bytes())})
    r = response.json()
    assert response.status_code == 200 and r["faces"] == want["faces"] >= 1 and r["note"] is None
    assert r["score"] == pytest.approx(want["score"], abs=1e-5)


def test_cli_binds_loopback_and_warns_when_exposed_without_a_key(model, monkeypatch, capsys):
    import uvicorn

    from masm.cli.main import main

    calls = []

    def fake_run(app, **kwargs):  # records where it would listen; runs the app's startup and shutdown
        calls.append({**kwargs, "api_key": app.state.service.options.api_key})
        with TestClient(app):
            pass

    monkeypatch.setattr(uvicorn, "run", fake_run)
    monkeypatch.delenv("MASM_SERVE_API_KEY", raising=False)
    assert main(["serve", str(model)]) == 0
    assert calls[-1]["host"] == "127.0.0.1" and calls[-1]["port"] == 8000
    assert "warning" not in capsys.readouterr().err
    assert main(["serve", str(model), "--host", "0.0.0.0", "--port", "8123"]) == 0
    assert calls[-1]["host"] == "0.0.0.0" and "without an API key" in capsys.readouterr().err
    monkeypatch.setenv("MASM_SERVE_API_KEY", "from-the-environment")
    assert main(["serve", str(model), "--host", "0.0.0.0"]) == 0
    assert "warning" not in capsys.readouterr().err and calls[-1]["api_key"] == "from-the-environment"

    assert main(["serve", str(model), "--max-batch", "0"]) == 2
    assert "max_batch must be > 0" in capsys.readouterr().err
    assert main(["serve", str(model / "missing")]) == 2
    err = capsys.readouterr().err
    assert "not found" in err and "Traceback" not in err
    assert len(calls) == 3


# -- a real `masm serve` on loopback ----------------------------------------------------------------------


def test_bad_input_corpus_gets_4xx_each_and_the_server_keeps_serving(server, corpus):
    good, bad = corpus
    good_png = good["rgb"].read_bytes()
    expected = {  # name -> (status, fragment of the one-line reason)
        "zero": (400, "empty upload"),
        "truncated": (422, "truncated"),
        "not_image": (415, "neither an image nor a video"),
        "tiny": (422, "too small"),
        "bomb": (413, "decompression bomb"),
        "corrupt_video": (415, "not recognised"),
        "empty_video": (422, "no video stream"),
        "long_video": (413, "--max-video-frames"),
    }
    with httpx.Client(base_url=server, timeout=60) as c:
        for name, (status, fragment) in expected.items():
            response = c.post("/v1/detect", files={"file": (bad[name].name, bad[name].read_bytes())})
            assert response.status_code == status, (name, response.text)
            reason = assert_one_line_reason(response, fragment)
            assert str(bad[name].parent) not in reason
            assert_healthy(c, good_png)

        # What a file path, a folder or a form can get wrong, as requests.
        boundary = "b0undary"
        requests = {
            # `masm detect` on a missing path: a request without the file
            "missing": dict(files={"other": ("a.png", good_png)}),
            # ... on an empty folder: a browser form sent with no file chosen
            "empty_folder": dict(files={"file": ("", b"")}),
            "too_large": dict(files={"file": ("big.png", b"\x89PNG\r\n\x1a\n" + os.urandom(2_100_000))}),
            "wrong_type": dict(content=b"{}", headers={"Content-Type": "application/json"}),
            "no_boundary": dict(content=b"x", headers={"Content-Type": "multipart/form-data"}),
            "truncated_form": dict(
                content=f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n'.encode()
                + good_png[:100],
                headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
            ),
            "bad_query": dict(params={"explain": "perhaps"}, files={"file": ("a.png", good_png)}),
        }
        statuses = {
            "missing": (400, "no file"),
            "empty_folder": (400, "empty upload"),
            "too_large": (413, "--max-upload-mb"),
            "wrong_type": (415, "Content-Type"),
            "no_boundary": (400, "boundary"),
            "truncated_form": (400, "truncated"),
            "bad_query": (422, "explain"),
        }
        for name, kwargs in requests.items():
            response = c.post("/v1/detect", **kwargs)
            status, fragment = statuses[name]
            assert response.status_code == status, (name, response.text)
            assert_one_line_reason(response, fragment)
            assert_healthy(c, good_png)
        # A client that goes away half-way through its upload (the server log is checked for tracebacks).
        host, port = server.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as raw:
            head = "POST /v1/detect HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
            raw.sendall(f"{head}Content-Length: 100000\r\n\r\n".encode() + good_png[:500])
        assert_healthy(c, good_png)
        assert c.get("/v1/nothing").status_code == 404 and c.get("/v1/detect").status_code == 405
        health = c.get("/health").json()
        assert health["refused"] >= len(expected) + len(requests) and health["admitted"] == 0


@pytest.mark.slow
def test_load_concurrent_clients_batch_and_beat_one_at_a_time(server):
    """Loopback load test, bounded: 8 clients x 96 requests against one client x 96, after a warm-up."""
    bodies = [multipart_body(png) for png in random_pngs(8, 96)]
    load(server, bodies, 8, 16)
    start = time.perf_counter()
    single = load(server, bodies, 1, 96)
    concurrent = load(server, bodies, 8, 96)
    ratio = concurrent["requests_per_s"] / single["requests_per_s"]
    print(
        f"\nserve load: one client {single['requests_per_s']:.1f} req/s (p50 {single['p50_ms']:.1f} ms, "
        f"p99 {single['p99_ms']:.1f} ms); 8 clients {concurrent['requests_per_s']:.1f} req/s "
        f"(p50 {concurrent['p50_ms']:.1f} ms, p99 {concurrent['p99_ms']:.1f} ms); ratio {ratio:.2f}"
    )
    assert single["errors"] == 0 and concurrent["errors"] == 0, (single, concurrent)
    assert time.perf_counter() - start < 60
    with httpx.Client(base_url=server) as c:
        health = c.get("/health").json()
    assert health["largest_batch"] > 1  # requests that arrived together shared a forward pass
    # Batching must pay; masm bench serve (docs/benchmarks.md) gives the number, this only guards against losing it.
    assert ratio > 1.15, (single, concurrent)


# -- the page, in headless Chromium ------------------------------------------------------------------------


def chromium_driver():
    """Selenium on Debian's chromium and chromium-driver (nothing is downloaded)."""
    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not browser or not driver:
        reason = "Debian's chromium and chromium-driver are not installed (.ci/run installs them)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1000,1400"):
        options.add_argument(arg)
    return webdriver.Chrome(options=options, service=Service(executable_path=driver))


def test_page_in_headless_chromium_shows_verdict_plot_and_maps(server, corpus, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    good, _ = corpus
    with httpx.Client(base_url=server, timeout=60) as c:
        want = c.post("/v1/detect", files={"file": ("a.jpg", good["face"].read_bytes())}).json()
    # A real face in a video, so the screenshot shows what a colleague would drop on the page.
    video = write_video(tmp_path / "face.mp4", astronaut_frames(12, size=192, step=4))
    driver = chromium_driver()
    try:
        wait = WebDriverWait(driver, 60)
        driver.get(server + "/")
        wait.until(lambda d: "demo-clip" in d.find_element(By.ID, "model").text)

        driver.find_element(By.ID, "file").send_keys(str(good["face"]))
        wait.until(lambda d: d.find_element(By.ID, "status").text == "done")
        verdict = driver.find_element(By.ID, "verdict").text
        assert verdict == want["label"].capitalize()
        assert driver.find_element(By.ID, "score").text == f"P(fake) = {want['score']:.4f}"

        # Dropping a file on the page does the same as choosing it.
        drop = """
            const bytes = Uint8Array.from(atob(arguments[0]), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], "dropped.png", { type: "image/png" }));
            document.getElementById("drop").dispatchEvent(
                new DragEvent("drop", { dataTransfer: transfer, bubbles: true, cancelable: true }));
        """
        driver.execute_script(drop, base64.b64encode(good["rgb"].read_bytes()).decode())
        wait.until(lambda d: "dropped.png" in d.find_element(By.ID, "details").text)
        wait.until(lambda d: d.find_element(By.ID, "status").text == "done")
        assert driver.find_element(By.ID, "verdict").text in ("Fake", "Real")

        driver.find_element(By.ID, "explain").click()
        driver.find_element(By.ID, "file").send_keys(str(video))
        wait.until(lambda d: d.find_element(By.ID, "status").text == "done")
        assert driver.find_element(By.ID, "verdict").text in ("Fake", "Real")
        assert driver.find_element(By.ID, "error").text == ""
        points = driver.find_elements(By.CSS_SELECTOR, "#frame-plot circle")
        assert len(points) == 12 and driver.find_element(By.ID, "frames").is_displayed()
        maps = driver.find_elements(By.CSS_SELECTOR, "#map-grid img")
        assert len(maps) == 12
        wait.until(lambda d: all(d.execute_script("return arguments[0].naturalWidth", m) == 64 for m in maps))

        shot = Path(os.environ.get("MASM_SCREENSHOT", tmp_path / "serve-page.png"))
        shot.parent.mkdir(parents=True, exist_ok=True)
        assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 10_000

        # A bad file shows the service's one-line reason, and the page keeps working.
        bad = tmp_path / "notes.jpg"
        bad.write_text("not an image\n" * 20)
        driver.find_element(By.ID, "file").send_keys(str(bad))
        wait.until(lambda d: d.find_element(By.ID, "status").text.startswith("refused"))
        assert "neither an image nor a video" in driver.find_element(By.ID, "error").text
        logs = [e for e in driver.get_log("browser") if e["level"] == "SEVERE" and "415" not in e["message"]]
        assert not logs, json.dumps(logs)
    finally:
        driver.quit()
