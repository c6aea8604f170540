"""Serving: every endpoint, every bad input, the API key, app wiring; all on 127.0.0.1.

The app runs on the session's Ray (``served`` in tests/serving.py) with the tiny
model registered as models:/insight@champion, its concepts mined by the real
concepts step, and small limits, so each limit is cheap to cross. Hostile
input, slow clients and the fuzz run are in test_serve_hardening.py.
"""

from __future__ import annotations

import base64
import io
import json
import os
import struct
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT

pytest_plugins = ["serving"]
pytestmark = pytest.mark.usefixtures("release_serve_when_done")

from serving import API_KEY, LIMITS, png_bytes, sample_png  # noqa: E402


def assert_error(r, status: int, code: str | None = None) -> dict:
    """A refusal: the status, a JSON body {"error": {"code", "message"}} and (optionally) the code."""
    assert r.status_code == status, (r.status_code, r.text[:500])
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    assert body["error"]["message"], body
    if code is not None:
        assert body["error"]["code"] == code, body
    return body["error"]


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG header claiming ``width`` x ``height`` pixels, with almost no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 4096))
            + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def client(served):
    with served.client() as c:
        yield c


@pytest.fixture(scope="module")
def image() -> bytes:
    return sample_png("astronaut", 160)


# ------------------------------------------------------------------ endpoints


def test_healthz_and_model(served, client, tiny_model):
    import mlflow

    with served.client(key=None) as anon:
        r = anon.get("/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok"}  # open, so it says nothing else
    m = client.get("/v1/model").json()
    assert m["name"] == "insight" and m["version"] == "1" and m["run_id"] == tiny_model.run_id
    best = mlflow.MlflowClient(tiny_model.tracking_uri).get_run(tiny_model.run_id)  # the sweep's best trial
    assert m["uri"] == "models:/insight/1" and m["metrics"]["val_fvu"] == pytest.approx(best.data.metrics["val_fvu"])
    assert m["n_concepts"] == 256 and m["dim"] == 64 and m["grid"] == [7, 7] and sum(m["group_sizes"]) == 256
    k = tiny_model.sweep["best_overrides"]["sae.k"]
    assert m["config"]["sae"]["k"] == k and m["concepts_named"] is True and m["has_probe"] is False
    assert m["config"]["tasks"]["crop"] == 112 and "workdir" not in m["config"]
    assert m["limits"]["max_pixels"] == LIMITS["max_pixels"] and m["limits"]["body_timeout_s"] == 2.0
    # the model replica batches as ServeConfig says (the decorator's defaults are 8 and 0.01)
    assert m["batching"] == {"max_batch_size": LIMITS["max_batch_size"], "batch_wait_s": LIMITS["batch_wait_s"]}
    # no local path anywhere: the model is named by its registry name and version
    text = json.dumps(m)
    for secret in (str(served.root), str(served.checkpoint), "/tmp", API_KEY, "sqlite"):
        assert secret not in text, secret


def test_explain_matches_the_model_in_process(served, client, image):
    """The served answer is the model's: same concepts and scores as the Engine called directly."""
    from serve.engine import Engine, ModelLoader
    from serve.images import center_view, decode_image

    r = client.post("/v1/explain", files={"image": ("a.png", image, "image/png")}, data={"top_k": "6", "format": "png"})
    assert r.status_code == 200, r.text
    a = r.json()
    assert a["model"]["uri"] == "models:/insight/1" and a["format"] == "png" and a["grid"] == [7, 7]
    assert str(served.root) not in r.text and "/tmp" not in r.text
    assert a["image"] == {"width": 160, "height": 160, "format": "PNG"}
    assert a["view"] == {"x": 0.0, "y": 0.0, "width": 160.0, "height": 160.0}
    assert 0 < a["fidelity"]["cosine"] <= 1 and a["fidelity"]["l0"] > 0
    assert 1 <= len(a["concepts"]) <= 6
    scores = [c["score"] for c in a["concepts"]]
    assert scores == sorted(scores, reverse=True) and scores[-1] > 0
    assert len({c["label"] for c in a["concepts"]}) == len(a["concepts"])  # same-named concepts told apart
    for c in a["concepts"]:
        assert c["name"] and c["label"].startswith(c["name"]) and c["path"][-1]["id"] == c["id"]
        assert 0 < c["area"] <= 1 and 0 < c["mean"] <= c["score"]
        from PIL import Image

        heat = Image.open(io.BytesIO(base64.b64decode(c["heatmap_png"])))
        assert heat.size == (7, 7) and heat.mode == "RGBA"

    engine = Engine(ModelLoader("models:/insight@champion", served.tracking_uri, str(served.root / "inproc"))())
    view = center_view(decode_image(image, 10**8), engine.image_size)
    raw = engine.explain_batch([view.pixels], [6])[0]
    assert [c["id"] for c in a["concepts"]] == raw.ids.tolist()
    assert np.allclose(scores, raw.scores, rtol=1e-4, atol=1e-5)
    # fidelity: this view's FVU as training defines it, and the model's held-out figures beside it
    from insight.sae.metrics import fvu

    feats = engine.features([view.pixels]).reshape(-1, engine.sae.d_in)
    assert a["fidelity"]["fvu"] == pytest.approx(fvu(feats, engine.sae.decode(engine.sae.encode(feats))), rel=1e-3)
    held_out = {k: v for k, v in engine.loaded.metrics.items() if k in ("val_fvu", "val_cosine")}
    assert held_out and {k: a["fidelity"][k] for k in held_out} == pytest.approx(held_out, abs=1e-6)


def test_explain_json_raw_and_raw_body_agree(client, image):
    b64 = base64.b64encode(image).decode()
    j = client.post("/v1/explain", json={"image_b64": b64, "top_k": 4, "format": "raw"})
    assert j.status_code == 200, j.text
    concepts = j.json()["concepts"]
    for c in concepts:
        heat = np.asarray(c["heatmap"])
        assert heat.shape == (7, 7) and "heatmap_png" not in c
        assert heat.max() == pytest.approx(c["score"], rel=1e-4)  # the map is the activation itself
    data_url = client.post("/v1/explain?top_k=4&format=raw", json={"image_b64": f"data:image/png;base64,{b64}"})
    raw_body = client.post("/v1/explain?top_k=4", content=image, headers={"Content-Type": "image/png"})
    assert data_url.json()["concepts"] == concepts
    assert [c["id"] for c in raw_body.json()["concepts"]] == [c["id"] for c in concepts]
    jpeg = png_bytes(np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(io.BytesIO(image)).convert("RGB")),
                     "JPEG")
    r = client.post("/v1/explain", content=jpeg, headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 200 and r.json()["image"]["format"] == "JPEG"


def test_explain_packed_heatmaps_are_the_png_levels_and_the_raw_maps(client, image):
    """The default answer packs every heatmap into one uint8 array: decoded, it is the raw activation
    map within half a level, and exactly the level each PNG pixel is coloured by; its size is k*H*W."""
    from PIL import Image
    from serve.render import _lut, unpack_heatmaps

    packed = client.post("/v1/explain?top_k=5", content=image, headers={"Content-Type": "image/png"})
    png = client.post("/v1/explain?top_k=5&format=png", content=image, headers={"Content-Type": "image/png"}).json()
    raw = client.post("/v1/explain?top_k=5&format=raw", content=image, headers={"Content-Type": "image/png"}).json()
    assert packed.status_code == 200, packed.text
    a = packed.json()
    k = len(a["concepts"])
    assert a["format"] == "packed" and k >= 1 and all(set(c) & {"heatmap", "heatmap_png"} == set() for c in a["concepts"])
    h = a["heatmaps"]
    assert h["dtype"] == "uint8" and h["shape"] == [k, 7, 7] and len(h["scale"]) == k
    assert len(base64.b64decode(h["data"])) == k * 7 * 7  # bounded: one byte per patch and concept
    assert len(packed.content) < len(json.dumps(png))
    maps = unpack_heatmaps(h)
    levels = np.frombuffer(base64.b64decode(h["data"]), np.uint8).reshape(k, 7, 7)
    assert [c["id"] for c in png["concepts"]] == [c["id"] for c in raw["concepts"]] == [c["id"] for c in a["concepts"]]
    for j, (c_png, c_raw) in enumerate(zip(png["concepts"], raw["concepts"], strict=True)):
        exact = np.asarray(c_raw["heatmap"], dtype=np.float32)
        assert np.abs(maps[j] - exact).max() <= h["scale"][j] / 2 + 1e-5 * c_raw["score"] + 2e-6
        assert h["scale"][j] * 255 == pytest.approx(c_raw["score"], rel=1e-5, abs=2e-6)  # each map over its own peak
        rgba = np.asarray(Image.open(io.BytesIO(base64.b64decode(c_png["heatmap_png"]))).convert("RGBA"))
        assert (rgba[..., :3] == _lut()[levels[j]]).all()  # the PNG is coloured by the same level
    # where the ingress's time went, for clients and the benchmark
    timing = dict(part.strip().split(";dur=") for part in packed.headers["server-timing"].split(","))
    timing = {name: float(ms) for name, ms in timing.items()}
    assert {"read", "decode", "model", "replica", "compute", "render", "json", "app"} <= set(timing)
    assert min(timing.values()) >= 0 and timing["compute"] <= timing["replica"] <= timing["model"] <= timing["app"]


def test_concurrent_requests_are_batched_without_changing_answers(client):
    images = [sample_png(n, 128) for n in ("astronaut", "chelsea", "coffee", "rocket", "camera", "horse")]
    alone = [client.post("/v1/explain", content=im, headers={"Content-Type": "image/png"}).json() for im in images]
    results: dict[int, dict] = {}

    def hit(i: int) -> None:
        r = client.post("/v1/explain", content=images[i % len(images)], headers={"Content-Type": "image/png"})
        results[i] = r.json() if r.status_code == 200 else {"status": r.status_code, "text": r.text}

    threads = [threading.Thread(target=hit, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 12
    for i, res in results.items():
        want = alone[i % len(images)]
        assert [c["id"] for c in res["concepts"]] == [c["id"] for c in want["concepts"]], res
        assert np.allclose([c["score"] for c in res["concepts"]], [c["score"] for c in want["concepts"]], atol=1e-4)


def test_segment_labels_and_explanations(client, image):
    from PIL import Image

    classes = ["person", "sky", "grass"]
    r = client.post("/v1/segment", files={"image": ("a.png", image, "image/png")},
                    data={"classes": "person, sky,grass", "top_k": "3"})
    assert r.status_code == 200, r.text
    s = r.json()
    assert s["classes"] == classes and s["via"] == "concepts"
    labels = Image.open(io.BytesIO(base64.b64decode(s["label_map_png"])))
    assert labels.mode == "P" and list(labels.size) == s["size"]
    arr = np.asarray(labels)
    assert arr.max() < len(classes) and len(s["palette"]) == len(classes)
    assert sum(seg["pixels"] for seg in s["segments"]) == arr.size
    for seg in s["segments"]:
        assert seg["class"] == classes[seg["index"]] and seg["pixels"] == int((arr == seg["index"]).sum())
        assert 0 < len(seg["concepts"]) <= 3 and sum(abs(c["share"]) for c in seg["concepts"]) <= 1 + 1e-6
        assert all(c["path"][-1]["id"] == c["id"] for c in seg["concepts"])
        # exact decomposition: concept terms + bias = the segment's mean logit
        assert seg["concepts_total"] + seg["bias"] == pytest.approx(seg["mean_logit"], abs=1e-4)
    j = client.post("/v1/segment", json={"image_b64": base64.b64encode(image).decode(), "classes": classes,
                                         "format": "raw"})
    assert j.status_code == 200 and np.array_equal(np.asarray(j.json()["labels"]), arr)


def test_classify_zero_shot_and_probe_absent(client, image):
    r = client.post("/v1/classify", json={"image_b64": base64.b64encode(image).decode(),
                                          "classes": ["astronaut", "cat", "coffee cup"], "top_k": 3})
    assert r.status_code == 200, r.text
    c = r.json()
    assert c["mode"] == "zero-shot" and len(c["classes"]) == 3
    scores = [x["score"] for x in c["classes"]]
    assert scores == sorted(scores, reverse=True) and sum(scores) == pytest.approx(1.0, abs=1e-5)
    for x in c["classes"]:
        assert x["concepts"] and all(set(k) >= {"id", "label", "contribution", "share", "path"} for k in x["concepts"])
    no_probe = client.post("/v1/classify", content=image, headers={"Content-Type": "image/png"})
    assert "probe" in assert_error(no_probe, 400, "no_classes")["message"]


def test_concepts_paging_search_and_detail(served, client, tiny_model):
    page = client.get("/v1/concepts", params={"offset": 10, "limit": 5}).json()
    assert page["total"] == 256 and [i["id"] for i in page["items"]] == [10, 11, 12, 13, 14]
    assert page["named"] is True
    every = client.get("/v1/concepts", params={"limit": 500}).json()["items"]
    levels = {i["level"] for i in every}
    lvl = client.get("/v1/concepts", params={"level": max(levels), "limit": 500}).json()
    assert lvl["total"] == sum(i["level"] == max(levels) for i in every) and all(
        i["level"] == max(levels) for i in lvl["items"])
    name = next(i["name"] for i in every if i["name"])
    hits = client.get("/v1/concepts", params={"q": name}).json()
    assert hits["total"] >= 1 and any(i["name"] == name for i in hits["items"])
    assert client.get("/v1/concepts", params={"q": "#12"}).json()["items"][0]["id"] == 12
    # galleries: the files the concepts step wrote, found by the server under the same name (one function)
    from PIL import Image

    from insight.concepts.galleries import gallery_name

    folder = Path(tiny_model.concepts["galleries"])
    drawn = sorted(int(p.name[len("concept-"):-len(".png")]) for p in folder.glob("concept-*.png"))
    assert drawn and sorted(i["id"] for i in every if i["has_gallery"]) == drawn
    d = client.get(f"/v1/concepts/{drawn[0]}").json()
    png = base64.b64decode(d["gallery_png"])
    assert png == (folder / gallery_name(drawn[0])).read_bytes() and Image.open(io.BytesIO(png)).width > 100
    assert d["id"] == drawn[0] and d["path"][-1]["id"] == drawn[0] and d["named"] is True and d["name"]
    other = next(i["id"] for i in every if not i["has_gallery"])
    assert client.get(f"/v1/concepts/{other}").json()["gallery_png"] is None
    assert_error(client.get("/v1/concepts/256"), 404, "unknown_concept")
    assert_error(client.get("/v1/concepts/-1"), 404, "unknown_concept")
    assert_error(client.get("/v1/concepts/abc"), 422, "invalid_request")
    assert_error(client.get("/v1/concepts", params={"limit": 0}), 422)
    assert_error(client.get("/v1/concepts", params={"offset": -1}), 422)
    assert_error(client.get("/v1/concepts", params={"level": "x"}), 422)


def test_page_docs_and_static(served, client):
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert client.get("/static/app.js").status_code == 200
    assert_error(client.get("/static/../api.py"), 404)
    spec = client.get("/openapi.json").json()
    assert {"/v1/explain", "/v1/segment", "/v1/classify", "/v1/concepts", "/v1/concepts/{concept_id}",
            "/v1/model", "/healthz"} <= set(spec["paths"])
    assert "multipart/form-data" in spec["paths"]["/v1/explain"]["post"]["requestBody"]["content"]
    # /docs works offline: Swagger UI's script and style come from this server, nothing from a CDN
    docs = client.get("/docs")
    assert docs.status_code == 200 and "/docs-assets/swagger-ui-bundle.js" in docs.text
    assert "cdn" not in docs.text and "https://" not in docs.text.replace("https://fastapi", "")
    js = client.get("/docs-assets/swagger-ui-bundle.js")
    assert js.status_code == 200 and len(js.content) > 100_000
    assert client.get("/docs-assets/swagger-ui.css").status_code == 200


# ------------------------------------------------------------------ bad input


def test_bad_images_are_4xx(client, image):
    def raw(data: bytes, ctype: str = "image/png"):
        return client.post("/v1/explain", content=data, headers={"Content-Type": ctype})

    assert_error(raw(b"this is not an image at all"), 400, "invalid_image")
    assert_error(raw(os.urandom(3000)), 400, "invalid_image")
    assert_error(raw(image[: len(image) // 2]), 400, "truncated_image")
    jpeg = png_bytes(np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(io.BytesIO(image)).convert("RGB")),
                     "JPEG")
    assert_error(raw(jpeg[: len(jpeg) * 2 // 3], "image/jpeg"), 400, "truncated_image")
    assert_error(raw(b""), 400, "empty_body")
    assert_error(client.post("/v1/explain", files={"image": ("e.png", b"", "image/png")}), 400, "empty_image")
    # pixel limits, from the header: over serve.max_pixels, and over PIL's own bomb limit
    msg = assert_error(raw(png_header_only(3000, 2000)), 413, "image_too_large")["message"]
    assert "6,000,000" in msg and "4,000,000" in msg
    assert_error(raw(png_header_only(100_000, 100_000)), 413, "image_too_large")
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (2500, 2000)).save(buf, format="PNG")  # a real 5 MP image in a few kB
    assert len(buf.getvalue()) < 50_000
    assert_error(raw(buf.getvalue()), 413, "image_too_large")
    # an SVG (not on the decoder whitelist) and an EPS header are refused before any decoder runs
    assert_error(raw(b"<svg xmlns='http://www.w3.org/2000/svg'/>", "image/png"), 400, "invalid_image")
    assert_error(raw(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "image/png"), 400, "invalid_image")


def test_odd_but_valid_images_are_served(client):
    """Extreme shapes and every accepted format/mode decode and run (first frame of an animation)."""
    from PIL import Image

    rng = np.random.default_rng(0)

    def enc(im, fmt: str, **kw) -> bytes:
        buf = io.BytesIO()
        im.save(buf, format=fmt, **kw)
        return buf.getvalue()

    frames = [Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)) for _ in range(3)]
    cases = {
        "1x1": png_bytes(np.full((1, 1, 3), 200, np.uint8)),
        "1x50": png_bytes(rng.integers(0, 255, (1, 50, 3), dtype=np.uint8)),  # serve.max_aspect is 50
        "900x20": png_bytes(rng.integers(0, 255, (900, 20, 3), dtype=np.uint8)),
        "gif": enc(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        "png16": enc(Image.fromarray(rng.integers(0, 65535, (30, 40), dtype=np.uint16)), "PNG"),
        "la": enc(Image.new("LA", (20, 20), (90, 128)), "PNG"),
        "cmyk": enc(Image.new("CMYK", (20, 30), (0, 50, 100, 0)), "JPEG"),
        "webp": enc(Image.new("RGB", (20, 20), (1, 2, 3)), "WEBP"),
        "bmp": enc(Image.new("1", (20, 20)), "BMP"),
        "tiff": enc(Image.fromarray(rng.random((20, 20)).astype(np.float32)), "TIFF"),
    }
    for name, data in cases.items():
        r = client.post("/v1/explain?top_k=3", content=data, headers={"Content-Type": "application/octet-stream"})
        assert r.status_code == 200, (name, r.text[:300])
    r = client.post("/v1/segment", files={"image": ("a.png", cases["1x50"], "image/png")}, data={"classes": "a,b"})
    assert r.status_code == 200 and r.json()["size"] == [50, 1], r.text[:300]


def test_bad_bodies_are_4xx(client, image):
    big = os.urandom(LIMITS["max_body_bytes"] + 10)
    msg = assert_error(client.post("/v1/explain", content=big, headers={"Content-Type": "image/png"}), 413,
                       "body_too_large")["message"]
    assert "1,000,000" in msg

    def chunks():
        for _ in range(40):
            yield os.urandom(32_768)

    assert_error(client.post("/v1/explain", content=chunks(), headers={"Content-Type": "image/png"}), 413,
                 "body_too_large")
    assert_error(client.post("/v1/explain", content=image, headers={"Content-Type": "text/plain"}), 415,
                 "unsupported_media_type")
    assert_error(client.post("/v1/explain", content=image, headers={"Content-Type": ""}), 415)
    assert_error(client.post("/v1/explain", content=b"{not json", headers={"Content-Type": "application/json"}),
                 400, "malformed_json")
    assert_error(client.post("/v1/explain", json=[1, 2]), 422, "invalid_request")
    assert "image_b64" in assert_error(client.post("/v1/explain", json={"top_k": 3}), 422)["message"]
    assert "imgae_b64" in assert_error(client.post("/v1/explain", json={"imgae_b64": "x"}), 422)["message"]
    assert_error(client.post("/v1/explain", json={"image_b64": "@@not base64@@"}), 400, "invalid_base64")
    assert_error(client.post("/v1/explain", json={"image_b64": "data:image/png,abc"}), 400, "invalid_base64")
    assert_error(client.post("/v1/explain", files={"picture": ("a.png", image, "image/png")}), 400, "missing_image")
    assert_error(client.post("/v1/explain", data={"image": "text, not a file"}, files={"x": ("x", b"1")}), 400)
    bad_multipart = b"--zzz\r\nContent-Disposition: form-data; name=\"image\"\r\n\r\nabc"
    assert_error(client.post("/v1/explain", content=bad_multipart,
                             headers={"Content-Type": "multipart/form-data; boundary=other"}), 400)
    assert_error(client.post("/v1/explain", content=b"x", headers={"Content-Type": "multipart/form-data"}), 400,
                 "malformed_multipart")
    assert_error(client.post("/v1/explain", files={"image": ("a.png", image, "image/png")}, data={"colour": "red"}),
                 422, "invalid_request")
    for k in ("0", "17", "x"):
        assert_error(client.post(f"/v1/explain?top_k={k}", content=image, headers={"Content-Type": "image/png"}), 422)
    assert_error(client.post("/v1/explain?format=gif", content=image, headers={"Content-Type": "image/png"}), 422)
    assert_error(client.get("/v1/nothing-here"), 404, "not_found")
    assert_error(client.delete("/v1/explain"), 405, "method_not_allowed")
    assert client.get("/healthz").status_code == 200


def test_bad_class_lists_are_4xx(client, image):
    b64 = base64.b64encode(image).decode()

    def seg(classes):
        return client.post("/v1/segment", json={"image_b64": b64, "classes": classes})

    assert_error(client.post("/v1/segment", json={"image_b64": b64}), 422)
    assert_error(seg([]), 400, "no_classes")
    assert_error(seg([f"class {i}" for i in range(9)]), 400, "too_many_classes")
    assert_error(seg(["cat", "  "]), 400, "empty_class_name")
    assert_error(seg(["x" * 201]), 400, "class_name_too_long")
    assert_error(seg(["cat", "Cat"]), 400, "duplicate_class")
    assert_error(seg("cat"), 422)
    assert_error(client.post("/v1/segment", files={"image": ("a.png", image, "image/png")}, data={"classes": ""}),
                 400, "empty_class_name")
    assert_error(client.post("/v1/segment", files={"image": ("a.png", image, "image/png")},
                             data={"classes": "[1, 2]"}), 422)
    assert_error(client.post("/v1/classify", json={"image_b64": b64, "classes": []}), 400, "no_classes")


def test_api_key(served):
    with served.client(key=None) as anon, served.client(key="wrong") as wrong, served.client() as ok:
        for c in (anon, wrong):
            r = c.get("/v1/model")
            assert_error(r, 401, "unauthorized")
            assert r.headers["www-authenticate"].startswith("Basic")
            assert_error(c.get("/"), 401)
            assert_error(c.post("/v1/explain", content=b"x" * 10, headers={"Content-Type": "image/png"}), 401)
        assert anon.get("/healthz").status_code == 200
        assert ok.get("/v1/model").status_code == 200
        assert anon.get("/v1/model", auth=("anyone", API_KEY)).status_code == 200  # HTTP Basic, for browsers
        assert_error(anon.get("/v1/model", auth=("anyone", "nope")), 401)


# ------------------------------------------------------------------ app wiring and the CLI


def test_config_yaml_and_build_app_args(tiny_model, monkeypatch):
    import yaml
    from ray.serve.schema import ServeDeploySchema
    from serve.app import build_app, check_model, resolve

    doc = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(doc) if hasattr(ServeDeploySchema, "model_validate") \
        else ServeDeploySchema.parse_obj(doc)
    app = schema.applications[0]
    assert app.import_path == "serve.app:build_app" and doc["http_options"]["host"] == "127.0.0.1"
    cfg, ref, _ = resolve(app.args)
    assert ref == "models:/insight@champion" and cfg.serve.max_batch_size == 8
    with pytest.raises(ValueError, match="unknown args"):
        build_app({"modle": "x"})
    with pytest.raises(ValueError, match="serve.max_batch_size"):
        resolve({"serve": {"max_batch_size": 0}})
    # The API key of a RayService comes from a Secret through the environment; a configured key wins.
    monkeypatch.setenv("INSIGHT_SERVE_API_KEY", "from-secret")
    assert resolve({})[0].serve.api_key == "from-secret"
    assert resolve({"serve": {"api_key": "from-config"}})[0].serve.api_key == "from-config"
    monkeypatch.delenv("INSIGHT_SERVE_API_KEY")
    assert resolve({})[0].serve.api_key is None
    with pytest.raises(ValueError, match="expected models:/"):
        check_model("no-such-thing", "sqlite:///:memory:")
    check_model("models:/insight@champion", tiny_model.tracking_uri)
    check_model("models:/insight/1", tiny_model.tracking_uri)
    check_model(str(tiny_model.checkpoint), tiny_model.tracking_uri)
    for missing in ("models:/insight@nope", "models:/insight/7", "0" * 32):
        with pytest.raises(ValueError, match="not found"):
            check_model(missing, tiny_model.tracking_uri)


def test_engine_uses_the_models_concepts_and_probe(tiny_model, tiny_probe, tmp_path):
    """Names, hierarchy paths and galleries come from the concept table the concepts step mined for the
    champion; a model loaded from its checkpoint folder finds them beside it, and its probe too (the probe
    `insight evaluate --probe` trained in conftest.tiny_probe, put where that step puts it for a checkpoint
    folder model)."""
    import shutil

    from serve.engine import Engine, ModelLoader

    from insight.concepts.galleries import gallery_name
    from insight.models import load_model
    from insight.tasks.classification import ConceptProbe

    lm = load_model("models:/insight@champion", tracking_uri=tiny_model.tracking_uri, dst=str(tmp_path / "m"))
    table = lm.concepts
    shutil.copytree(tiny_probe.folder, lm.checkpoint.parent / "probe")
    probe = ConceptProbe.load(tiny_probe.folder)
    engine = Engine(ModelLoader(str(lm.checkpoint))())
    info = engine.info()
    assert engine.concepts.named and info["concepts_named"] and info["concepts_source"] == "concept table"
    assert info["uri"].startswith("checkpoint:sha256=") and str(tmp_path) not in json.dumps(info)
    assert info["has_probe"] and info["probe_classes"] == probe.class_names == ["pattern", "photo"]
    child = next(c for c in table if c.parents)
    d = engine.concept_detail(child.id)
    assert d["name"] == child.name and d["parents"][0]["id"] == child.parents[0]
    assert d["path"][-1]["id"] == child.id and d["path"][-2]["id"] == child.parents[0]
    assert [c["name"] for c in d["candidates"]] == [c.name for c in child.candidates]
    drawn = next(c.id for c in table if (lm.checkpoint.parent / "concepts" / "galleries" / gallery_name(c.id)).is_file())
    gallery = engine.concept_detail(drawn)["gallery_png"]
    assert base64.b64decode(gallery) == (lm.checkpoint.parent / "concepts" / "galleries" / gallery_name(drawn)).read_bytes()
    page = engine.concepts_page(child.name, None, 0, 300)
    assert child.id in [i["id"] for i in page["items"]]
    from serve.images import center_view, decode_image

    view = center_view(decode_image(sample_png(), 10**8), engine.image_size)
    raw = engine.explain_batch([view.pixels], [5])[0]
    assert all(c["name"] for c in raw.concepts) and all(c["path"][-1]["id"] == c["id"] for c in raw.concepts)
    probed = engine.classify(view.pixels, None, 3)
    assert probed["mode"].startswith("probe") and {c["class"] for c in probed["classes"]} == {"pattern", "photo"}
    assert probed["classes"][0]["score"] >= probed["classes"][1]["score"]
    assert any(k["concepts"] for k in probed["classes"])
    for k in probed["classes"]:
        contributions = [c["contribution"] for c in k["concepts"]]
        assert contributions == sorted(contributions, reverse=True) and probe.class_names[k["index"]] == k["class"]
        # a contribution is w[class, concept] * (the concept's pooled code, >= 0): it has the weight's sign
        assert all(c["contribution"] > 0 and probe.weight_cm[k["index"], c["id"]] > 0 and c["name"] for c in k["concepts"])


def test_static_files_are_self_contained():
    """The page loads nothing from other hosts (the browser may have no network)."""
    for f in (ROOT / "serve" / "static").iterdir():
        text = f.read_text()
        assert "http://" not in text and "https://" not in text and "//cdn" not in text, f
    assert Path(ROOT / "serve" / "static" / "index.html").is_file()
