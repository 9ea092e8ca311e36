"""The two in-replica ways of serving many models, in one minimal deployment that differs only in
how a request finds its model: Ray Serve's `@serve.multiplexed` (the model id in the
`serve_multiplexed_model_id` header, which Serve's router also uses to prefer a replica that holds
the model) or the platform's `ModelFleet` (the name in the path, every replica serves every model).

Both share the rest: a `ChampionModel` per model (alias polling, hot swap), one `@serve.batch`
queue grouped by model, orjson in and out. No auth and no row validation, so what differs is the
look-up alone. Deployed next to the inference app by benchmarks/serving_shapes.py, never by the
platform.
"""

from __future__ import annotations

from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict
from ray import serve
from ray.serve import Application
from starlette.requests import Request
from starlette.responses import Response

from serve_apps.champion import BatchResult, ChampionModel
from serve_apps.fleet import ModelFleet, Routed, UnknownModelError, predict_by_model

# As many models as the platform's fleet keeps by default (MODEL_MAX_SERVED).
MAX_MODELS = 16


class ShapeArgs(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    multiplexed: bool
    default_model: str
    alias: str
    tracking_uri: str
    poll_interval_s: float
    max_batch_size: int
    batch_wait_timeout_s: float


@serve.deployment
class ShapeModels:
    async def __init__(self, args: ShapeArgs) -> None:  # type: ignore[misc]  # Serve awaits it
        import torch

        # As the inference replica does: its event loop is the unit of parallelism.
        torch.set_num_threads(1)
        self._args = args
        self._batch.set_max_batch_size(args.max_batch_size)  # type: ignore[attr-defined]
        self._batch.set_batch_wait_timeout_s(args.batch_wait_timeout_s)  # type: ignore[attr-defined]
        self._fleet = ModelFleet(self._champion(args.default_model), self._champion, MAX_MODELS)
        if not args.multiplexed:
            await self._fleet.default.start()

    def _champion(self, name: str) -> ChampionModel:
        return ChampionModel(name, self._args.alias, self._args.tracking_uri, self._args.poll_interval_s)

    @serve.multiplexed(max_num_models_per_replica=MAX_MODELS)  # type: ignore[untyped-decorator]
    async def _multiplexed_model(self, model_id: str) -> ChampionModel:
        champion = self._champion(model_id)
        await champion.start()
        if champion.loaded is None:
            champion.stop()
            raise UnknownModelError(model_id, self._args.alias)
        return champion

    async def _model(self, request: Request) -> ChampionModel:
        if self._args.multiplexed:
            return await self._multiplexed_model(serve.get_multiplexed_model_id())
        return await self._fleet.get(request.url.path.rstrip("/").rsplit("/", 1)[-1])

    @serve.batch
    async def _batch(self, requests: list[Routed]) -> list[BatchResult]:
        return predict_by_model(requests)

    async def __call__(self, request: Request) -> Response:
        try:
            champion = await self._model(request)
        except UnknownModelError as error:
            return Response(orjson.dumps({"detail": str(error)}), status_code=404, media_type="application/json")
        rows = orjson.loads(await request.body())["instances"]
        model = champion.loaded
        assert model is not None  # the fleet and _multiplexed_model hand out loaded models only
        result: BatchResult = await self._batch(Routed(champion, model, rows))
        body = {"model": result.model.ref, "predictions": result.predictions}
        return Response(orjson.dumps(body), media_type="application/json")


def build(args: dict[str, Any]) -> Application:
    return ShapeModels.bind(ShapeArgs.model_validate(args))  # type: ignore[attr-defined]
