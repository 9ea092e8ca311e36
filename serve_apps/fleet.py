"""Every model one ingress replica serves: the default model (`MODEL_NAME`) from the start, and any
other registered model whose champion alias is set, loaded on its first request.

A model becomes servable when the promotion gate sets its alias: no code change, no redeploy, no
restart of the models already served. Each model is a `ChampionModel` of its own (alias polling,
hot swap, the serving-contract check), and all of them share the replica's batch queue
(`Ingress._predict_batch` groups a batch by model version: a canary's challenger is one more). The
replica keeps at most `max_models` models; the least recently used one other than the default
makes room, and loads again on its next request.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import NamedTuple

from mlflow.tracking import MlflowClient

from jobs.config import MODEL_NAME_PATTERN
from serve_apps.champion import BatchResult, ChampionModel, LoadedModel, Rows

# How many names that are not servable models the replica remembers, and for how long, so that
# requests for them do not each cost a registry look-up.
MISSING_REMEMBERED = 1024


class UnknownModelError(Exception):
    """No registered model of this name has the champion alias: a 404."""

    def __init__(self, name: str, alias: str) -> None:
        super().__init__(f"no model {name!r} is served: no registered model of that name has a {alias!r} alias")
        self.name = name


class ModelUnavailableError(Exception):
    """The model may exist, but the registry could not be asked or the version not loaded: a 503."""


def aliased_models(client: MlflowClient, alias: str) -> list[tuple[str, str]]:
    """Blocking: every registered model whose `alias` is set, with the version it names, by name."""
    found: list[tuple[str, str]] = []
    token: str | None = None
    while True:
        page = client.search_registered_models(max_results=200, page_token=token)
        found.extend((model.name, str(model.aliases[alias])) for model in page if alias in (model.aliases or {}))
        token = page.token
        if not token:
            return sorted(found)


class ModelFleet:
    def __init__(
        self,
        default: ChampionModel,
        make: Callable[[str], ChampionModel],
        max_models: int,
    ) -> None:
        self.default = default
        self._make = make
        self.max_models = max_models
        self._others: OrderedDict[str, ChampionModel] = OrderedDict()
        self._loading: dict[str, asyncio.Task[ChampionModel]] = {}
        self._missing: OrderedDict[str, float] = OrderedDict()

    async def servable(self, registry: MlflowClient) -> list[tuple[str, str]]:
        """Every model with the champion alias in the registry, and the version it names."""
        return await asyncio.to_thread(aliased_models, registry, self.default.alias)

    def served(self) -> list[ChampionModel]:
        """The models loaded in this replica, the default first."""
        return [self.default, *self._others.values()]

    def set_poll_interval(self, seconds: float) -> None:
        for champion in self.served():
            champion.poll_interval_s = seconds

    async def get(self, name: str) -> ChampionModel:
        """The model `name`, loading it on first use; raises UnknownModelError when the registry has
        no such model with the alias, ModelUnavailableError when it cannot tell or load it."""
        if name == self.default.model_name:
            return self.default
        found = self._others.get(name)
        if found is not None:
            self._others.move_to_end(name)
            return found
        if not re.fullmatch(MODEL_NAME_PATTERN, name) or self._recently_missing(name):
            raise UnknownModelError(name, self.default.alias)
        loading = self._loading.get(name)
        if loading is None:
            loading = asyncio.get_running_loop().create_task(self._load(name))
            self._loading[name] = loading
            loading.add_done_callback(lambda _: self._loading.pop(name, None))
        # Shielded: a client that gives up does not cancel the load that other requests wait on.
        return await asyncio.shield(loading)

    async def _load(self, name: str) -> ChampionModel:
        champion = self._make(name)
        await champion.start()
        if champion.loaded is None:
            champion.stop()
            if champion.last_error is not None:
                raise ModelUnavailableError(f"model {name!r} could not be loaded: {champion.last_error}")
            self._remember_missing(name)
            raise UnknownModelError(name, champion.alias)
        self._others[name] = champion
        while len(self._others) > max(self.max_models - 1, 0):
            _, evicted = self._others.popitem(last=False)
            # Requests in flight keep the version they hold; only the alias polling ends.
            evicted.stop()
        return champion

    def _recently_missing(self, name: str) -> bool:
        expiry = self._missing.get(name)
        if expiry is None:
            return False
        if expiry < time.monotonic():
            del self._missing[name]
            return False
        return True

    def _remember_missing(self, name: str) -> None:
        # For one poll interval: a model promoted meanwhile is found within the time any swap takes.
        self._missing[name] = time.monotonic() + self.default.poll_interval_s
        self._missing.move_to_end(name)
        while len(self._missing) > MISSING_REMEMBERED:
            self._missing.popitem(last=False)

    def stop(self) -> None:
        for champion in self.served():
            champion.stop()
        for loading in self._loading.values():
            loading.cancel()


class Routed(NamedTuple):
    """One request's share of the replica's batch queue: its rows (validated columns, or objects),
    and the version that answers them (the champion, or a canary's challenger), chosen when the
    request was validated."""

    champion: ChampionModel
    model: LoadedModel
    rows: Rows


def predict_by_model(requests: list[Routed]) -> list[BatchResult]:
    """One model call per model version in a joined batch; the results in the requests' order."""
    groups: dict[int, tuple[ChampionModel, LoadedModel, list[int]]] = {}
    for position, (champion, model, _) in enumerate(requests):
        group = groups.get(id(model))
        if group is None:
            group = groups[id(model)] = (champion, model, [])
        group[2].append(position)
    if len(groups) == 1:  # the usual batch: one model, results already in order
        champion, model, _ = next(iter(groups.values()))
        return champion.predict([rows for _, _, rows in requests], model)
    results: dict[int, BatchResult] = {}
    for champion, model, positions in groups.values():
        answered = champion.predict([requests[p].rows for p in positions], model)
        results.update(zip(positions, answered, strict=True))
    return [results[position] for position in range(len(requests))]
