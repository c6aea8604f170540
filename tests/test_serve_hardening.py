"""Hostile input against the real served app: every class refused with a 4xx, in bounded time and memory.

Runs on the session's Serve (``served`` in tests/serving.py, small limits) and
measures what each class costs: the answer's status and error body, the
wall time, and the resident memory of the serve processes (proxy, ingress
and model replicas of this session's Ray, read from /proc). A seeded fuzz run
of at least 500 generated hostile requests ends the module; valid requests
must still be answered during and after.
"""

from __future__ import annotations

import base64
import io
import json
import os
import random
import re
import socket
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest_plugins = ["serving"]
pytestmark = pytest.mark.usefixtures("release_serve_when_done")

from serving import API_KEY, LIMITS, png_bytes, sample_png  # noqa: E402

REPR = re.compile(r"0x[0-9a-fA-F]{6,}|<_io|object at|Traceback")  # object reprs, addresses, tracebacks
RSS_GROWTH_MB = 400  # what a module of hostile traffic may leave resident in the serve processes
FUZZ_REQUESTS = 500
FUZZ_SECONDS = 60


# ------------------------------------------------------------------ measuring the server


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            kids.setdefault(ppid, []).append(int(entry))
    return kids


def serve_pids() -> dict[int, str]:
    """This session's Serve processes (descendants of this pytest: its private Ray), by process title."""
    kids, out, todo = _children(), {}, [os.getpid()]
    while todo:
        for pid in kids.get(todo.pop(), []):
            todo.append(pid)
            try:
                title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            except OSError:
                continue
            if "ServeReplica:insight" in title or "ProxyActor" in title:
                out[pid] = title
    return out


def rss_mb(pids) -> float:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


class Peak:
    """Samples the serve processes' total RSS every 20 ms while a block runs."""

    def __init__(self, pids) -> None:
        self.pids, self.peak, self._stop = list(pids), 0.0, threading.Event()

    def __enter__(self) -> Peak:
        def loop() -> None:
            while not self._stop.is_set():
                self.peak = max(self.peak, rss_mb(self.pids))
                time.sleep(0.02)

        self._t = threading.Thread(target=loop, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()


@pytest.fixture(scope="module")
def server(served):
    """(served, pids, baseline RSS in MB): the baseline after one valid request of each kind warmed it up."""
    with served.client() as c:
        image = sample_png("astronaut", 96)
        assert c.post("/v1/explain", content=image, headers={"Content-Type": "image/png"}).status_code == 200
        assert c.post("/v1/segment", files={"image": ("a.png", image, "image/png")},
                      data={"classes": "a,b"}).status_code == 200
    pids = serve_pids()
    titles = " ".join(pids.values())
    assert "InsightIngress" in titles and "InsightModel" in titles and "ProxyActor" in titles, pids
    from serve.app import INGRESS_MALLOC_ENV

    for pid, title in pids.items():  # the ingress returns freed decode buffers to the system
        if "InsightIngress" in title:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            assert all(f"{k}={v}".encode() in environ for k, v in INGRESS_MALLOC_ENV.items()), title
    return served, pids, rss_mb(pids)


@pytest.fixture(scope="module")
def client(served):
    with served.client() as c:
        yield c


def assert_error(r, status: int, code: str | None = None, seconds: float | None = None) -> dict:
    assert r.status_code == status, (r.status_code, r.text[:300])
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    message = body["error"]["message"]
    assert message and not REPR.search(message), message
    if code is not None:
        assert body["error"]["code"] == code, body
    if seconds is not None:
        assert r.elapsed.total_seconds() < seconds, (code, r.elapsed)
    return body["error"]


def still_serving(c, image: bytes) -> None:
    assert c.get("/healthz").json() == {"status": "ok"}
    r = c.post("/v1/explain?top_k=3", content=image, headers={"Content-Type": "image/png"})
    assert r.status_code == 200 and r.json()["concepts"], r.text[:300]


# ------------------------------------------------------------------ crafted inputs


def png_header_only(width: int, height: int, depth: int = 8, colour: int = 0) -> bytes:
    """A valid PNG header claiming ``width`` x ``height`` pixels, with almost no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 4096))
            + chunk(b"IEND", b""))


def jpeg_scans(d: bytes) -> list[tuple[int, int]]:
    """(start, end) of each scan of a JPEG: the SOS segment and its entropy-coded data."""
    out, i = [], 0
    while (i := d.find(b"\xff\xda", i)) >= 0:
        j = i + 2 + struct.unpack(">H", d[i + 2 : i + 4])[0]
        while True:
            k = d.index(b"\xff", j)
            if d[k + 1] != 0 and not 0xD0 <= d[k + 1] <= 0xD7:
                break
            j = k + 1
        out.append((i, k))
        i = k
    return out


def many_scan_jpeg(repeats: int, side: int = 1000) -> bytes:
    """A real progressive JPEG whose cheapest AC scan is repeated: a few bytes each, a pass over every block
    each (libjpeg warns and decodes them all)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (side, side), 128).save(buf, "JPEG", progressive=True, quality=90)
    d = buf.getvalue()
    a, b = min(jpeg_scans(d)[1:], key=lambda s: s[1] - s[0])
    return d[:b] + d[a:b] * repeats + d[b:]


def deep(n: int) -> str:
    return "[" * n + "]" * n


# ------------------------------------------------------------------ the classes of issue 14


def test_deep_json_and_invalid_text_are_4xx(server, client):
    served, pids, _ = server
    b64 = base64.b64encode(sample_png("coffee", 64)).decode()
    raw = {"Content-Type": "application/json"}
    with Peak(pids) as peak:
        t0 = rss_mb(pids)
        # nested past the parser's recursion limit: in the body, inside image_b64, in classes, in a multipart field
        for body in (f'{{"image_b64": {deep(1500)}}}', f'{{"image_b64": "{b64}", "classes": {deep(1500)}}}',
                     deep(1500)):
            assert_error(client.post("/v1/segment", content=body.encode(), headers=raw), 400, "json_too_deep", 2)
        r = client.post("/v1/segment", files={"image": ("a.png", base64.b64decode(b64), "image/png")},
                        data={"classes": deep(1500)})
        assert_error(r, 400, "json_too_deep", 2)
        # more structure than any valid request: counted before parsing
        body = json.dumps({"image_b64": b64, "classes": ["a"] * 150_000}).encode()
        assert len(body) < LIMITS["max_body_bytes"]
        msg = assert_error(client.post("/v1/segment", content=body, headers=raw), 400, "json_too_complex", 2)
        assert "150,0" in msg["message"]
        assert_error(client.post("/v1/segment", content=b'{"image_b64": "", "classes": ' + b"[]," * 300_000 + b"[]}",
                                 headers=raw), 400, "json_too_complex", 2)
        # a million-name class field in a multipart body: counted before validation
        r = client.post("/v1/segment", files={"image": ("a.png", base64.b64decode(b64), "image/png")},
                        data={"classes": "a," * 30_000})
        assert_error(r, 400, "too_many_classes", 2)
    assert peak.peak - t0 < 200, (peak.peak, t0)

    # lone surrogates: escaped in JSON, raw bytes in JSON, in a multipart field, in a field name
    seg = [b'{"image_b64": "%s", "classes": ["cat", "\\ud800"]}' % b64.encode(),
           b'{"image_b64": "%s", "classes": ["\\udfff dog"]}' % b64.encode()]
    for body in seg:
        msg = assert_error(client.post("/v1/segment", content=body, headers=raw), 400, "invalid_text")["message"]
        assert "surrogate" in msg
    assert_error(client.post("/v1/segment", content=b'{"image_b64": "%s", "classes": ["\xed\xa0\x80"]}'
                             % b64.encode(), headers=raw), 400, "invalid_text")
    r = client.post("/v1/segment", files={"image": ("a.png", base64.b64decode(b64), "image/png")},
                    data={"classes": '["cat", "\\ud800"]'})
    assert_error(r, 400, "invalid_text")
    boundary = "b0undary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode() + base64.b64decode(b64) + (
        f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"classes\"\r\n\r\n").encode() + \
        b"cat,\xed\xa0\x80\r\n" + f"--{boundary}--\r\n".encode()
    r = client.post("/v1/segment", content=body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert "classes" in assert_error(r, 400, "invalid_text")["message"]
    msg = assert_error(client.post("/v1/explain", content=b'{"image_b64": "", "\\ud800x": 1}', headers=raw), 422)
    assert "\\ud800" in msg["message"]
    assert_error(client.post("/v1/explain", content=b'{"image_b64": "\\ud800"}', headers=raw), 400, "invalid_base64")
    still_serving(client, base64.b64decode(b64))


def test_images_that_cost_too_much_are_refused_before_decoding(server, client):
    served, pids, _ = server
    octet = {"Content-Type": "application/octet-stream"}
    # extreme aspect ratios within serve.max_pixels: refused from the header
    for w, h in ((3_000_000, 1), (1, 3_000_000), (100_000, 2)):
        msg = assert_error(client.post("/v1/explain", content=png_header_only(w, h), headers=octet), 400,
                           "extreme_aspect_ratio", 2)["message"]
        assert "serve.max_aspect" in msg
    strip = png_bytes(np.full((1, 25_000, 3), 90, np.uint8))
    for path in ("/v1/explain", "/v1/classify?top_k=2", "/v1/segment"):
        r = client.post(path, files={"image": ("s.png", strip, "image/png")},
                        data={} if "explain" in path else {"classes": "a,b"})
        assert_error(r, 400, "extreme_aspect_ratio", 2)
    # a JPEG with thousands of scans: decoding it takes seconds here; the server refuses it from its bytes
    from PIL import Image

    slow = many_scan_jpeg(3000)
    assert len(slow) < 60_000
    t0 = time.perf_counter()
    Image.open(io.BytesIO(slow)).load()
    decode_s = time.perf_counter() - t0
    r = client.post("/v1/explain", content=slow, headers=octet)
    msg = assert_error(r, 400, "too_many_scans")["message"]
    assert "3,00" in msg and r.elapsed.total_seconds() < max(0.5, decode_s / 2), (r.elapsed, decode_s)
    ok = many_scan_jpeg(10, side=200)  # a progressive JPEG with a few repeated scans is still an image
    assert client.post("/v1/explain?top_k=2", content=ok, headers=octet).status_code == 200
    # over the pixel limit, and a PNG header that lies about its size
    assert_error(client.post("/v1/explain", content=png_header_only(5000, 1000), headers=octet), 413,
                 "image_too_large", 2)
    assert_error(client.post("/v1/explain", content=png_header_only(1000, 1000), headers=octet), 400,
                 "truncated_image", 5)
    # errors say what is wrong in words, never an object repr
    for junk in (b"GIF89a" + os.urandom(50), b"\x89PNG\r\n\x1a\n" + os.urandom(40), os.urandom(2000)):
        r = client.post("/v1/explain", content=junk, headers=octet)
        # random header bytes may declare a size over the pixel limit: then it is refused as too large
        msg = assert_error(r, 413 if r.status_code == 413 else 400, "image_too_large" if r.status_code == 413
                           else None)["message"]
        assert "BytesIO" not in msg and " at 0x" not in msg, msg


def test_deep_images_at_the_pixel_limit_stay_within_the_decode_budget(server, client):
    """16-bit and float images at serve.max_pixels, three at once: answered, and the ingress stays within
    serve.decode_memory_bytes plus what the answers themselves hold."""
    from PIL import Image

    served, pids, _ = server
    side = int(LIMITS["max_pixels"] ** 0.5)
    rng = np.random.default_rng(1)
    grey = rng.integers(0, 65535, (side // 8, side // 8), dtype=np.uint16).repeat(8, 0).repeat(8, 1)
    images = []
    for img in (Image.fromarray(grey), Image.fromarray(grey.astype(np.float32) / 7.0)):
        buf = io.BytesIO()
        img.save(buf, format="TIFF", compression="tiff_deflate")
        assert len(buf.getvalue()) < LIMITS["max_body_bytes"], len(buf.getvalue())
        images.append(buf.getvalue())
    ingress = [p for p, t in pids.items() if "InsightIngress" in t]
    before = rss_mb(ingress)
    with Peak(ingress) as peak, ThreadPoolExecutor(3) as pool:
        t0 = time.perf_counter()
        answers = list(pool.map(lambda d: client.post("/v1/explain?top_k=2", content=d,
                                                      headers={"Content-Type": "image/tiff"}), images + images[:1]))
        wall = time.perf_counter() - t0
    assert all(r.status_code == 200 for r in answers), [(r.status_code, r.text[-200:]) for r in answers]
    assert answers[0].json()["image"] == {"width": side, "height": side, "format": "TIFF"}
    budget_mb = LIMITS["decode_memory_bytes"] / 2**20
    print(f"deep images: ingress RSS {before:.0f} -> peak {peak.peak:.0f} MB (budget {budget_mb:.0f} MB), {wall:.1f} s")
    assert peak.peak - before < budget_mb + 64 and wall < 60


def test_slow_clients_are_cut_off_and_health_answers_meanwhile(server, client):
    """70 connections that declare a 1 MB body and send 100 bytes of it: /healthz and valid requests are
    answered while they hang, each gets 408 once serve.body_timeout_s has passed, and those whose declared
    bodies do not fit serve.body_memory_bytes (64 MiB here: 67 do) get 429 at once."""
    served, pids, _ = server
    port = int(served.url.rsplit(":", 1)[1])
    image = sample_png("coffee", 64)
    socks = []
    t_open = time.perf_counter()
    for _ in range(70):
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        s.sendall(b"POST /v1/explain HTTP/1.1\r\nHost: x\r\nX-API-Key: " + API_KEY.encode() +
                  b"\r\nContent-Type: image/png\r\nContent-Length: 1000000\r\n\r\n" + image[:100])
        socks.append(s)
    try:
        t0 = time.perf_counter()
        assert client.get("/healthz").json() == {"status": "ok"}
        r = client.post("/v1/explain?top_k=2", content=image, headers={"Content-Type": "image/png"})
        assert r.status_code == 200, r.text[:300]
        served_while_held = time.perf_counter() - t0
        replies = []
        for s in socks:
            data = b""
            while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
            replies.append(data)
        cut_off = time.perf_counter() - t_open
    finally:
        for s in socks:
            s.close()
    statuses = sorted(r.split(b" ", 2)[1] for r in replies)
    fit = LIMITS["body_memory_bytes"] // 1_000_000
    assert statuses == [b"408"] * fit + [b"429"] * (70 - fit), statuses
    assert sum(b'"body_timeout"' in r for r in replies) == fit
    assert sum(b'"too_many_requests"' in r and b"serve.body_memory_bytes" in r for r in replies) == 70 - fit
    print(f"slow clients: valid request answered in {served_while_held:.2f} s while 70 hang; all cut off after "
          f"{cut_off:.1f} s")
    assert served_while_held < LIMITS["body_timeout_s"] and cut_off < LIMITS["body_timeout_s"] + 15


def _raw(port: int, request: bytes, timeout: float = 15) -> tuple[bytes, float]:
    """Send raw bytes, read until the server answers a final status or closes; (reply, seconds)."""
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(request)
            data = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
                finals = [line for line in data.split(b"\r\n") if line.startswith(b"HTTP/1.1 ")
                          and not line.startswith(b"HTTP/1.1 100")]
                if finals and data.rstrip().endswith(b"}"):
                    break
        except OSError:
            pass
    return data, time.perf_counter() - t0


def test_header_limits_expect_continue_and_chunk_sizes(server):
    served, pids, base = server
    port = int(served.url.rsplit(":", 1)[1])
    key = b"X-API-Key: " + API_KEY.encode() + b"\r\n"
    many = b"".join(b"X-%d: v\r\n" % i for i in range(20_000))
    reply, s = _raw(port, b"GET /v1/model HTTP/1.1\r\nHost: x\r\n" + key + many + b"\r\n")
    assert reply.startswith(b"HTTP/1.1 431") and b"serve.max_headers" in reply and s < 10, (reply[:200], s)
    big = b"X-Big: " + b"a" * 1_000_000 + b"\r\n"
    reply, s = _raw(port, b"GET /v1/model HTTP/1.1\r\nHost: x\r\n" + key + big + b"\r\n")
    assert reply.startswith(b"HTTP/1.1 431") and s < 10, (reply[:200], s)
    # Expect: 100-continue with a declared 50 MB body: the proxy may say "100 Continue" (it cannot be
    # configured), the app answers 413 from the declared length before reading a byte of it
    reply, s = _raw(port, b"POST /v1/explain HTTP/1.1\r\nHost: x\r\n" + key + b"Content-Type: image/png\r\n"
                    b"Expect: 100-continue\r\nContent-Length: 52428800\r\n\r\n")
    print("expect 100-continue:", [line for line in reply.split(b"\r\n") if line.startswith(b"HTTP/1.1 ")])
    final = [line for line in reply.split(b"\r\n") if line.startswith(b"HTTP/1.1 ") and b" 100 " not in line]
    assert final and final[0].startswith(b"HTTP/1.1 413") and s < 10, (reply[:300], s)
    # a chunk that announces 2^64-1 bytes: refused by the proxy's parser, or cut off by serve.body_timeout_s
    reply, s = _raw(port, b"POST /v1/explain HTTP/1.1\r\nHost: x\r\n" + key + b"Content-Type: image/png\r\n"
                    b"Transfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\n" + b"a" * 1000)
    print(f"chunk of 2^64-1 bytes: {reply[:60]!r} after {s:.1f} s")
    assert (reply == b"" or reply.startswith(b"HTTP/1.1 4")) and s < LIMITS["body_timeout_s"] + 10, (reply[:200], s)
    # a chunked body over the limit is refused while it streams in
    chunk = b"a" * 65536
    stream = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(20))
    reply, s = _raw(port, b"POST /v1/explain HTTP/1.1\r\nHost: x\r\n" + key + b"Content-Type: image/png\r\n"
                    b"Transfer-Encoding: chunked\r\n\r\n" + stream + b"0\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 413") and b"body_too_large" in reply, reply[:300]
    # a client header cannot lift the app's own deadline (Ray's proxy honours x-request-timeout-seconds)
    reply, s = _raw(port, b"POST /v1/explain HTTP/1.1\r\nHost: x\r\n" + key + b"Content-Type: image/png\r\n"
                    b"X-Request-Timeout-Seconds: 0\r\nContent-Length: 1000\r\n\r\nabc",
                    timeout=LIMITS["body_timeout_s"] + 20)
    assert reply.startswith(b"HTTP/1.1 408") and s < LIMITS["body_timeout_s"] + 10, (reply[:200], s)
    with served.client() as c:
        still_serving(c, sample_png("coffee", 64))


def test_leaks(server, client):
    served, _, _ = server
    image = sample_png("astronaut", 96)
    with served.client(key=None) as anon:
        assert anon.get("/healthz").json() == {"status": "ok"}
    answers = [client.post("/v1/explain?top_k=2", content=image, headers={"Content-Type": "image/png"}),
               client.post("/v1/segment", files={"image": ("a.png", image, "image/png")}, data={"classes": "a,b"}),
               client.post("/v1/classify", json={"image_b64": base64.b64encode(image).decode(), "classes": ["a", "b"]}),
               client.get("/v1/model"), client.get("/v1/concepts/3")]
    for r in answers:
        assert r.status_code == 200, r.text[:200]
        for leak in (str(served.root), str(served.checkpoint), "/tmp/", "workdir", "mlflow.db", API_KEY):
            assert leak not in r.text, (r.url, leak)
    assert answers[0].json()["model"] == {"name": "insight", "version": "1", "run_id": answers[0].json()["model"][
        "run_id"], "uri": "models:/insight/1"}


# ------------------------------------------------------------------ fuzz


def _random_json(rng: random.Random, depth: int = 0):
    kind = rng.randrange(8 if depth < 3 else 4)
    if kind == 0:
        return rng.choice([None, True, False])
    if kind == 1:
        return rng.choice([0, -1, 1, 17, 10**30, 1e308, -0.5])
    if kind == 2:
        return "".join(chr(rng.randrange(32, 0x2FFF)) for _ in range(rng.randrange(0, 30)))
    if kind == 3:
        return rng.choice(["image_b64", "classes", "top_k", "format", "png", "raw", "", "\u0000", "\ud800", "a\udfffb"])
    if kind == 4:
        return [_random_json(rng, depth + 1) for _ in range(rng.randrange(0, 5))]
    if kind == 5:
        return json.loads(deep(rng.randrange(1, 50)))
    keys = ["image_b64", "classes", "top_k", "format", "probe", "x", "\ud801"]
    return {rng.choice(keys): _random_json(rng, depth + 1) for _ in range(rng.randrange(0, 5))}


def test_fuzz_no_5xx_bounded_time_and_memory(server):
    """At least 500 seeded hostile requests, four at a time: no 5xx, every 4xx a JSON error, each answered
    in bounded time, the serve processes' memory back within bounds, valid requests answered meanwhile."""
    served, pids, base = server
    rng = random.Random(20240607)
    image = sample_png("chelsea", 96)
    b64 = base64.b64encode(image).decode()
    scans = many_scan_jpeg(400, side=400)
    paths = ["/v1/explain", "/v1/segment", "/v1/classify", "/v1/concepts", "/v1/concepts/3", "/v1/concepts/-7",
             "/v1/concepts/99999999999999999999999", "/v1/model", "/healthz", "/", "/static/app.js", "/docs",
             "/openapi.json", "/v2/explain", "/%00", "/v1/explain/../model", "/" + "a" * 3000,
             "/static/%2e%2e/api.py", "/v1/concepts?limit=abc&offset=-3", "/v1/concepts?q=" + "%ff" * 50,
             "/v1/concepts?q=%ed%a0%80", "/v1/explain?top_k=99999999999999999999", "/v1/explain?format=%00",
             "/static/", "/static/nope.js", "/docs-assets/swagger-ui.css"]
    methods = ["GET", "POST", "POST", "POST", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]
    ctypes = [None, "image/png", "image/jpeg", "application/json", "application/json", "multipart/form-data",
              "multipart/form-data; boundary=xyz", "text/plain", "application/octet-stream", "image/svg+xml",
              "application/json; charset=utf-16", "multipart/mixed", "image/png; q=0.5", "*/*", "x" * 300]

    def body(kind: int) -> bytes:
        if kind == 0:
            return b""
        if kind == 1:
            return rng.randbytes(rng.randrange(1, 6000))
        if kind == 2:
            return json.dumps(_random_json(rng)).encode()
        if kind == 3:
            doc = {"image_b64": rng.choice([b64, b64[: rng.randrange(len(b64))], "!!", "", "\ud800"]),
                   "classes": _random_json(rng), "top_k": _random_json(rng)}
            return json.dumps(doc).encode()
        if kind == 4:
            return image[: rng.randrange(len(image))]
        if kind == 5:  # bit flips in a real image
            b = bytearray(image)
            for _ in range(rng.randrange(1, 20)):
                b[rng.randrange(len(b))] = rng.randrange(256)
            return bytes(b)
        if kind == 6:
            boundary = rng.choice(["xyz", "b0undary", ""])
            part = rng.choice([image, rng.randbytes(200), b"", deep(2000).encode(), b"a\xed\xa0\x80b"])
            return (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{rng.choice(['image', 'classes', 'q'])}\";"
                    f" filename=\"f\"\r\nContent-Type: image/png\r\n\r\n").encode() + part + \
                rng.choice([f"\r\n--{boundary}--\r\n".encode(), b""])
        if kind == 7:  # nesting, structure, surrogates
            return rng.choice([deep(rng.randrange(900, 5000)).encode(), b'{"classes": ' + b"[1]," * 5000 + b"1}",
                               b'{"image_b64": "%s", "classes": ["\\ud800"]}' % b64.encode(),
                               b'{"image_b64": "%s", "classes": ["\xed\xa0\x80"]}' % b64.encode()])
        if kind == 8:  # headers that lie: aspect, size, depth
            return png_header_only(*rng.choice([(rng.randrange(1, 200_000), rng.randrange(1, 200_000)),
                                                (1, rng.randrange(100, 3_900_000)), (rng.randrange(100, 3_900_000), 1)]),
                                   depth=rng.choice([8, 16]), colour=rng.choice([0, 2]))
        return scans

    def make() -> tuple:
        """One request, drawn from the seeded generator (in order, so a run is reproducible)."""
        keyed_client = rng.random() < 0.85
        method, path = rng.choice(methods), rng.choice(paths)
        headers = {}
        ctype = rng.choice(ctypes)
        if ctype is not None:
            headers["Content-Type"] = ctype
        if rng.random() < 0.2:
            headers[f"X-{rng.randrange(10**6)}"] = "".join(chr(rng.randrange(33, 127)) for _ in range(50))
        if rng.random() < 0.05:
            headers.update({f"X-Many-{j}": "v" for j in range(150)})
        if rng.random() < 0.1:
            headers["Accept"] = rng.choice(["image/png", "*/*", "text/html", "\t"])
        content = body(rng.randrange(10)) if method not in ("GET", "HEAD", "OPTIONS") or rng.random() < 0.2 else None
        return keyed_client, method, path, headers, content

    def one(spec: tuple) -> tuple | None:
        keyed_client, method, path, headers, content = spec
        c = keyed if keyed_client else anon
        t0 = time.perf_counter()
        try:
            r = c.request(method, path, content=content, headers=headers)
        except Exception as exc:  # noqa: BLE001 - the client refusing to send (bad header) is not a server failure
            if "Connection" in type(exc).__name__ or "RemoteProtocol" in type(exc).__name__:
                return (method, path, f"connection dropped: {exc!r}")
            return None
        took = time.perf_counter() - t0
        if r.status_code >= 500:
            return (method, path, headers, (content or b"")[:80], r.status_code, r.text[:300])
        if took > 10:
            return (method, path, (content or b"")[:80], f"took {took:.1f} s")
        if r.status_code >= 400 and method != "HEAD" and r.headers.get("content-type", "").startswith("application/json"):
            if "error" not in r.json():
                return (method, path, r.status_code, r.text[:300])
        return None

    import httpx

    specs = [make() for _ in range(FUZZ_REQUESTS)]  # drawn in order from the seed, sent by four workers
    sent, failures = 0, []
    deadline = time.time() + FUZZ_SECONDS
    limits = httpx.Limits(max_connections=8)
    with served.client(limits=limits) as keyed, served.client(key=None, limits=limits) as anon, \
            Peak(pids) as peak, ThreadPoolExecutor(4) as pool:
        for start in range(0, len(specs), 20):
            if time.time() > deadline:
                break
            batch = specs[start : start + 20]
            failures += [f for f in pool.map(one, batch) if f]
            sent += len(batch)
            if start % 160 == 0:
                still_serving(keyed, image)  # valid requests answered during the barrage
    # raw, malformed HTTP on the socket: the server may answer 4xx or close, never 5xx
    port = int(served.url.rsplit(":", 1)[1])
    for junk in (b"GARBAGE\r\n\r\n", b"GET /healthz HTTP/9.9\r\n\r\n", b"POST /v1/explain HTTP/1.1\r\nHost: x\r\n"
                 b"Content-Length: -5\r\n\r\n", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(64),
                 b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-Long: " + b"a" * 70_000 + b"\r\n\r\n"):
        reply, _ = _raw(port, junk, timeout=10)
        assert not reply.startswith(b"HTTP/1.1 5"), (junk[:40], reply[:100])
        sent += 1
    after = rss_mb(pids)
    print(f"fuzz: {sent} requests; serve RSS {base:.0f} MB at start, peak {peak.peak:.0f}, after {after:.0f}")
    assert sent >= FUZZ_REQUESTS, f"only {sent} fuzz requests in {FUZZ_SECONDS} s"
    assert not failures, failures[:5]
    assert after - base < RSS_GROWTH_MB, (base, after)
    with served.client() as c:
        still_serving(c, image)
