"""The two Serve deployments: the model (batched) and the FastAPI ingress in front of it.

``InsightModel`` holds backbone + SAE + concept table (one :class:`Engine`)
and batches /v1/explain work with ``@serve.batch``. One refinement: a replica
with nothing in flight runs a request at once instead of waiting
``batch_wait_s`` for company that is not coming; requests that arrive while
it computes queue into the batch, so batches form exactly when there is load.
Compute runs on one worker thread, so the event loop keeps accepting (and
batching) requests meanwhile, and the model never runs twice at once.

``InsightIngress`` parses, bounds and decodes requests (``serve.api``) and
renders answers; it scales separately from the model (``serve.ingress_*``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from serve.common import ExplainRaw, ModelLoader

log = logging.getLogger("ray.serve")


def _serve_default(key: str) -> Any:
    """A ServeConfig default (the batch decorator needs values at import; __init__ sets the configured ones)."""
    from insight.config import ServeConfig

    return ServeConfig.model_fields[key].default


@serve.deployment(name="InsightModel")
class InsightModel:
    """One replica: the model, a single compute thread, a batch queue."""

    def __init__(self, loader: ModelLoader, threads: int = 1, tasks: dict[str, Any] | None = None) -> None:
        """``tasks``: the serve-time ``tasks.*`` overrides. Batching comes from ServeConfig as the
        deployment's user_config (:meth:`reconfigure`, called before any request)."""
        from serve.engine import Engine  # torch: only model replicas import it

        self.engine = Engine(loader(), threads=threads, tasks=tasks)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="insight-model")
        self._inflight = 0
        log.info("InsightModel ready: %s (%d concepts, %s)", self.engine.public_ref(),
                 self.engine.sae.n_concepts, self.engine.concepts.source)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Batching knobs (ServeConfig's, as Serve's user_config): changed in place, without reloading the model."""
        if "max_batch_size" in user_config:
            self._explain_batched.set_max_batch_size(int(user_config["max_batch_size"]))
        if "batch_wait_s" in user_config:
            self._explain_batched.set_batch_wait_timeout_s(float(user_config["batch_wait_s"]))

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def info(self) -> dict[str, Any]:
        """The model's description, and the batching this replica runs with (ServeConfig's)."""
        batched = self._explain_batched
        return {**self.engine.info(), "batching": {"max_batch_size": batched._get_max_batch_size(),
                                                   "batch_wait_s": batched._get_batch_wait_timeout_s()}}

    async def ping(self) -> bool:
        return True

    async def explain(self, view: Any, top_k: int) -> ExplainRaw:
        t0 = time.perf_counter()
        idle = self._inflight == 0
        self._inflight += 1
        try:
            if idle:
                raw = (await self._run(self.engine.explain_batch, [view], [top_k]))[0]
            else:
                raw = await self._explain_batched((view, top_k))
        finally:
            self._inflight -= 1
        raw.replica_ms = (time.perf_counter() - t0) * 1e3  # the ingress's Server-Timing reports it
        return raw

    @serve.batch(max_batch_size=_serve_default("max_batch_size"), batch_wait_timeout_s=_serve_default("batch_wait_s"))
    async def _explain_batched(self, items: list[tuple[Any, int]]) -> list[ExplainRaw]:
        views = [v for v, _ in items]
        ks = [k for _, k in items]
        return await self._run(self.engine.explain_batch, views, ks)

    async def segment(self, image: Any, classes: list[str], top_k: int) -> dict[str, Any]:
        return await self._run(self.engine.segment, image, classes, top_k)

    async def classify(self, view: Any, classes: list[str] | None, top_k: int) -> dict[str, Any]:
        return await self._run(self.engine.classify, view, classes, top_k)

    async def concepts_page(self, q: str | None, level: int | None, offset: int, limit: int) -> dict[str, Any]:
        return self.engine.concepts_page(q, level, offset, limit)

    async def concept_detail(self, concept_id: int) -> dict[str, Any] | None:
        return self.engine.concept_detail(concept_id)


class HandleBackend:
    """serve.api's Backend over a deployment handle to InsightModel.

    Explain and classify send one model-sized view (at most ``image_size``^2 x 3 bytes) and get a
    small answer back: they go straight to the replica's gRPC server (``_by_reference=False``, the
    path Ray Serve's throughput-optimised mode uses) instead of as a Ray actor call, whose
    arguments over 100 kB also pass through the object store. On the loaded 2-core machine it measured
    3.4-5.7 ms this way against 5.4 ms by reference, within the noise (docs/benchmarks.md,
    Serving). Segmentation sends the whole image, which can pass gRPC's 4 MB message limit, so
    it stays on Ray's path.
    """

    def __init__(self, handle: DeploymentHandle) -> None:
        self.h = handle
        self.direct = handle.options(_by_reference=False)

    async def explain(self, view: Any, top_k: int) -> ExplainRaw:
        return await self.direct.explain.remote(view, top_k)

    async def segment(self, image: Any, classes: list[str], top_k: int) -> dict[str, Any]:
        return await self.h.segment.remote(image, classes, top_k)

    async def classify(self, view: Any, classes: list[str] | None, top_k: int) -> dict[str, Any]:
        return await self.direct.classify.remote(view, classes, top_k)

    async def concepts_page(self, q: str | None, level: int | None, offset: int, limit: int) -> dict[str, Any]:
        return await self.h.concepts_page.remote(q, level, offset, limit)

    async def concept_detail(self, concept_id: int) -> dict[str, Any] | None:
        return await self.h.concept_detail.remote(concept_id)

    async def ping(self) -> bool:
        return bool(await self.h.ping.remote())


@serve.deployment(name="InsightIngress")
@serve.ingress()
class InsightIngress:
    """HTTP in front of the model: JSON API, OpenAPI docs, the browser page."""

    async def __init__(self, model: DeploymentHandle, settings: dict[str, Any]) -> None:
        from insight.config import ServeConfig

        self.limits = ServeConfig.model_validate(settings)
        self.backend = HandleBackend(model)
        self.info = await model.info.remote()

    def __serve_build_asgi_app__(self) -> Any:
        from serve.api import build_api

        return build_api(self.backend, self.limits, self.info)
