"""The log and trace pipeline of compose, end to end in its configuration: every platform process's
JSON lines land in a file the OpenTelemetry collector tails, the collector turns `service` into
`service.name` and the ids into the record's trace fields and ships them to Loki, Loki keeps them,
and Grafana's dashboards and datasources query and link what the pipeline produces. Then, in
process, that core/logs.py really writes those files.

No container runs here (see tests/unit/test_compose.py), so the paths are followed through the
files: a service's LOG_DIR, its volume, the collector's mount of that volume, its include globs."""

from __future__ import annotations

import json
import logging
import logging.config
import re
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from core import logs
from core.logs import JsonFormatter, SharedRotatingFileHandler, add_log_file, configure_logging, log_context, log_file
from core.settings import REPO_ROOT, RaySettings, Settings
from tests.compose_file import COMPOSE_FILE, environment, services

COLLECTOR_FILE = REPO_ROOT / "cluster/otel-collector/config.yaml"
LOKI_FILE = REPO_ROOT / "cluster/loki/loki.yaml"
TEMPO_FILE = REPO_ROOT / "cluster/tempo/tempo.yaml"
DATASOURCES_FILE = REPO_ROOT / "cluster/grafana/provisioning/datasources/datasources.yaml"
DASHBOARDS = sorted((REPO_ROOT / "cluster/grafana/dashboards").glob("*.json"))
SERVE_CONFIG = REPO_ROOT / "serve_apps/config.yaml"
DOCKERFILE = REPO_ROOT / "Dockerfile"
COLLECTOR = "otel-collector"
LOKI_EXPORTER = "otlphttp/loki"
# What the platform's services are built from; every long-running one runs project code.
PLATFORM_IMAGE = "ray-cluster-platform"
EXPECTED_PLATFORM_SERVICES = {"ray-head", "ray-worker", "dispatcher", "mlflow", "ui"}
# A trace and span id in the W3C form the platform logs them.
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN_ID = "00f067aa0ba902b7"
# Fields the collector's OTLP record carries besides the line's attributes, as Loki names them.
RECORD_FIELDS = {"trace_id", "span_id", "severity_text", "severity_number"}


# --- Reading the files ---------------------------------------------------------------------------


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def one_shot(service: dict[str, Any]) -> bool:
    return str(service.get("restart", "no")) == "no"


def platform_services() -> dict[str, dict[str, Any]]:
    """The long-running services that run the platform's image, i.e. project code."""
    return {
        name: service
        for name, service in services().items()
        if str(service.get("image", "")).split(":")[0] == PLATFORM_IMAGE and not one_shot(service)
    }


def command_text(service: dict[str, Any]) -> str:
    command = service.get("command") or []
    return command if isinstance(command, str) else " ".join(str(part) for part in command)


def mounts(service: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """Container path -> (named volume, read-only) for the named volumes a service mounts."""
    found = {}
    for volume in service.get("volumes", []):
        parts = str(volume).split(":")
        if parts[0].startswith((".", "/")):
            continue
        found[parts[1]] = (parts[0], len(parts) > 2 and "ro" in parts[2].split(","))
    return found


def volume_of(service: dict[str, Any], path: PurePosixPath) -> tuple[str, PurePosixPath, bool] | None:
    """(volume, path inside the volume, read-only) for a container path on a named volume."""
    for target, (volume, read_only) in sorted(mounts(service).items(), key=lambda item: -len(item[0])):
        if path == PurePosixPath(target) or PurePosixPath(target) in path.parents:
            return volume, path.relative_to(target), read_only
    return None


def collector() -> dict[str, Any]:
    return dict(load_yaml(COLLECTOR_FILE))


def logs_pipeline() -> dict[str, Any]:
    return dict(collector()["service"]["pipelines"]["logs"])


def filelog_receivers() -> dict[str, dict[str, Any]]:
    """The filelog receivers of the pipeline that exports to Loki."""
    pipeline = logs_pipeline()
    assert LOKI_EXPORTER in pipeline["exporters"], pipeline
    receivers = collector()["receivers"]
    return {name: receivers[name] for name in pipeline["receivers"] if name.split("/")[0] == "filelog"}


def operators() -> list[dict[str, Any]]:
    return [op for receiver in filelog_receivers().values() for op in receiver.get("operators", [])]


def glob_regex(pattern: str) -> re.Pattern[str]:
    """A filelog include glob (doublestar syntax) as a regex: `**/` is any number of folders,
    `*` and `?` never cross a `/`."""
    out = ""
    index = 0
    while index < len(pattern):
        if pattern.startswith("**/", index):
            out, index = out + "(?:[^/]+/)*", index + 3
        elif pattern[index] == "*":
            out, index = out + "[^/]*", index + 1
        elif pattern[index] == "?":
            out, index = out + "[^/]", index + 1
        else:
            out, index = out + re.escape(pattern[index]), index + 1
    return re.compile(out + r"\Z")


def collected(path_in_collector: PurePosixPath) -> bool:
    globs = [glob for receiver in filelog_receivers().values() for glob in receiver["include"]]
    excluded = [glob for receiver in filelog_receivers().values() for glob in receiver.get("exclude", [])]
    text = str(path_in_collector)
    return any(glob_regex(g).match(text) for g in globs) and not any(glob_regex(g).match(text) for g in excluded)


def collector_path(service: dict[str, Any], path: PurePosixPath) -> PurePosixPath:
    """Where the collector sees a file a service writes; fails when it does not see it at all."""
    found = volume_of(service, path)
    assert found is not None, f"{path} is on no named volume, so no other container sees it"
    volume, inside, read_only = found
    assert not read_only, f"{path} is on a read-only mount of {volume}"
    for target, (mounted, _) in mounts(services()[COLLECTOR]).items():
        if mounted == volume:
            return PurePosixPath(target) / inside
    pytest.fail(f"the collector does not mount {volume}, where {path} lies")


def logged_service_names() -> set[str]:
    """Every name a process of ours logs under: configure_logging's callers, and add_log_file's in
    compose (MLflow's workers)."""
    names = set()
    packages = [path.parent for path in REPO_ROOT.glob("*/__init__.py") if path.parent.name != "tests"]
    for source in (source for package in packages for source in package.rglob("*.py")):
        names |= set(re.findall(r"configure_logging\(\s*\"([\w.-]+)\"", source.read_text(encoding="utf-8")))
    names |= set(re.findall(r"add_log_file\(.*?,\s*\"([\w.-]+)\"", COMPOSE_FILE.read_text(encoding="utf-8")))
    return names


def datasources() -> dict[str, dict[str, Any]]:
    return {source["type"]: source for source in load_yaml(DATASOURCES_FILE)["datasources"]}


def unescape(text: str) -> str:
    # Grafana expands $VAR in provisioning files; `$$` stands for a literal `$`.
    return text.replace("$$", "$")


def walk(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


def loki_queries() -> list[str]:
    """Every LogQL query Grafana runs: the dashboards' Loki targets and Tempo's trace-to-logs."""
    queries = []
    for path in DASHBOARDS:
        for node in walk(json.loads(path.read_text(encoding="utf-8"))):
            source = node.get("datasource")
            if "expr" in node and isinstance(source, dict) and source.get("type") == "loki":
                queries.append(str(node["expr"]))
    queries.append(unescape(datasources()["tempo"]["jsonData"]["tracesToLogsV2"]["query"]))
    return queries


MATCHER = re.compile(r'([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)\s*"')


def stream_labels(query: str) -> set[str]:
    selector = re.match(r"\s*\{([^}]*)\}", query)
    assert selector is not None, f"no stream selector in {query!r}"
    return set(MATCHER.findall(selector.group(1)))


def filter_labels(query: str) -> set[str]:
    """Labels of the pipeline's label filters (`| trace_id="..."`)."""
    after = query[query.index("}") + 1 :]
    return set(re.findall(r"\|\s*([A-Za-z_]\w*)\s*(?:=~|!~|!=|=|>=|<=|>|<)", after))


def loki_index_labels() -> set[str]:
    """Resource attributes Loki makes index labels of, as label names."""
    config = load_yaml(LOKI_FILE)["limits_config"].get("otlp_config", {}).get("resource_attributes", {})
    attributes = {
        attribute
        for rule in config.get("attributes_config", [])
        if rule.get("action") == "index_label"
        for attribute in rule.get("attributes", [])
    }
    return {attribute.replace(".", "_") for attribute in attributes}


def resource_attributes_set() -> set[str]:
    """Resource attributes the collector puts on every file's line, as label names."""
    found = set()
    for op in operators():
        target = str(op.get("to") or op.get("field") or "")
        match = re.fullmatch(r'resource\["([^"]+)"\]', target)
        if match is not None:
            found.add(match.group(1))
    processors = collector()["processors"]
    for name in logs_pipeline()["processors"]:
        for action in (processors.get(name) or {}).get("attributes", []):
            if name.split("/")[0] == "resource" and action.get("action") in {"upsert", "insert"}:
                found.add(action["key"])
    return {attribute.replace(".", "_") for attribute in found}


def formatted_line(**extra: Any) -> dict[str, Any]:
    record = logging.LogRecord("platform.test", logging.WARNING, __file__, 1, "hello", (), None)
    for key, value in extra.items():
        setattr(record, key, value)
    return dict(json.loads(JsonFormatter("svc").format(record)))


# --- Every platform service writes where the collector reads ---------------------------------------


def test_the_platform_services_are_the_ones_running_project_code() -> None:
    assert set(platform_services()) == EXPECTED_PLATFORM_SERVICES


@pytest.mark.parametrize("name", sorted(EXPECTED_PLATFORM_SERVICES))
def test_each_service_writes_its_log_files_where_the_collector_tails_them(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = platform_services()[name]
    log_dir = environment(service).get("LOG_DIR")
    assert log_dir, f"{name}: no LOG_DIR, so its lines reach docker logs only"
    # The variable compose sets is the setting core.logs reads.
    monkeypatch.setenv("LOG_DIR", log_dir)
    assert Settings(_env_file=None).log_dir == Path(log_dir)
    names = logged_service_names()
    assert {"ui", "dispatcher", "mlflow", "trainer"} <= names, names
    for logged in sorted(names):
        path = PurePosixPath(log_file(logged, Path(log_dir)))
        assert collected(collector_path(service, path)), f"{name}: the collector does not tail {path}"


def test_rotated_copies_are_not_tailed_twice() -> None:
    service = platform_services()["dispatcher"]
    path = PurePosixPath(log_file("dispatcher", Path(environment(service)["LOG_DIR"])))
    assert collected(collector_path(service, path))
    assert not collected(collector_path(service, path.with_name(path.name + ".1")))


@pytest.mark.parametrize("name", ["ui", "dispatcher"])
def test_the_module_each_service_runs_configures_logging(name: str) -> None:
    module = re.search(r"python -m ([\w.]+)", command_text(platform_services()[name]))
    assert module is not None, name
    package = REPO_ROOT / module.group(1).replace(".", "/")
    sources = [*package.glob("*.py")] if package.is_dir() else [package.with_suffix(".py")]
    assert any("configure_logging(" in source.read_text(encoding="utf-8") for source in sources), module.group(1)


def test_mlflow_gives_its_workers_log_config_the_log_file() -> None:
    command = command_text(platform_services()["mlflow"])
    assert "mlflow_log_config" in command and "add_log_file" in command
    assert re.search(r"add_log_file\(mlflow_log_config\(settings\),\s*\"mlflow\",\s*settings\.log_dir\)", command)
    assert "--log-config $$log_config" in command


def test_serve_json_logs_on_the_head_are_tailed() -> None:
    """Serve's controller, proxy and replicas write their own JSON files under the head's Ray
    session directory (ray-tmp), which the collector mounts at the same path so that the
    absolute session_latest link resolves."""
    head = platform_services()["ray-head"]
    temp_dir = RaySettings(temp_dir=environment(head).get("RAY_TEMP_DIR")).resolved_temp_dir
    serve_logs = PurePosixPath(temp_dir) / "session_latest/logs/serve"
    for file in ("replica_inference_Ingress_abc123.log", "controller_42.log", "proxy_10.0.0.2.log"):
        path = serve_logs / file
        seen = collector_path(head, path)
        assert seen == path, f"the collector sees {path} at {seen}: session_latest would not resolve"
        assert collected(seen), path
    assert str(load_yaml(SERVE_CONFIG)["logging_config"]["encoding"]).upper() == "JSON"


def test_the_log_volume_is_handed_to_the_platform_user_before_anything_writes() -> None:
    """A new named volume belongs to root; the image runs as another user."""
    user = re.search(r"^USER\s+(\d+)", DOCKERFILE.read_text(encoding="utf-8"), flags=re.MULTILINE)
    assert user is not None
    all_services = services()
    for name, service in platform_services().items():
        volume, _, _ = volume_of(service, PurePosixPath(environment(service)["LOG_DIR"])) or ("", None, False)
        inits = [
            dep
            for dep in dependencies(all_services, name)
            if one_shot(all_services[dep])
            and str(all_services[dep].get("user", "")).split(":")[0] == "0"
            and volume in {v for v, _ in mounts(all_services[dep]).values()}
            and f"chown {user.group(1)}" in command_text(all_services[dep])
        ]
        assert inits, f"{name} may start before anything makes {volume} writable for uid {user.group(1)}"


def dependencies(all_services: dict[str, dict[str, Any]], name: str) -> set[str]:
    """Every service a service waits for, directly or through others."""
    found: set[str] = set()
    pending = [name]
    while pending:
        deps = all_services[pending.pop()].get("depends_on") or {}
        for dep in deps if isinstance(deps, list) else deps.keys():
            if dep not in found:
                found.add(dep)
                pending.append(dep)
    return found


# --- The collector: service name, trace ids, Loki ----------------------------------------------------


def test_the_files_are_read_in_the_pipeline_that_exports_to_loki() -> None:
    assert filelog_receivers(), "the Loki pipeline reads no log files"
    exporter = collector()["exporters"][LOKI_EXPORTER]
    assert exporter["endpoint"] == "http://loki:3100/otlp"
    assert "loki" in services()
    assert any(op["type"] == "json_parser" for op in operators())


def test_the_service_field_becomes_service_name() -> None:
    moves = [op for op in operators() if op["type"] == "move" and op.get("to") == 'resource["service.name"]']
    assert moves, "no operator sets service.name"
    field = moves[0]["from"].removeprefix("attributes.")
    assert field in formatted_line(), f"the platform's lines carry no {field!r} field"
    assert formatted_line()[field] == "svc"


def test_trace_ids_go_to_the_records_trace_fields() -> None:
    parsers = [op for op in operators() if op["type"] == "trace_parser"]
    assert len(parsers) == 1, parsers
    line = formatted_line(trace_id=TRACE_ID, span_id=SPAN_ID)
    for key in ("trace_id", "span_id"):
        field = parsers[0][key]["parse_from"].removeprefix("attributes.")
        assert line[field] == {"trace_id": TRACE_ID, "span_id": SPAN_ID}[key], key


def test_traces_go_to_tempo() -> None:
    config = collector()
    assert config["service"]["pipelines"]["traces"]["exporters"] == ["otlp/tempo"]
    assert config["exporters"]["otlp/tempo"]["endpoint"] == "tempo:4317"
    tempo = load_yaml(TEMPO_FILE)["distributor"]["receivers"]["otlp"]["protocols"]
    assert tempo["grpc"]["endpoint"].endswith(":4317")
    for name, service in platform_services().items():
        endpoint = environment(service).get("OTEL_EXPORTER_OTLP_ENDPOINT", "")
        assert re.fullmatch(r"\$\{OTEL_EXPORTER_OTLP_ENDPOINT:-http://otel-collector:4318\}", endpoint), name
    assert "4318" in [str(port) for port in services()[COLLECTOR]["expose"]]


def test_loki_accepts_structured_metadata() -> None:
    config = load_yaml(LOKI_FILE)
    assert config["limits_config"]["allow_structured_metadata"] is True
    latest = max(config["schema_config"]["configs"], key=lambda period: str(period["from"]))
    assert (latest["store"], latest["schema"]) == ("tsdb", "v13"), latest


# --- Grafana queries and links what the pipeline produces ----------------------------------------------


def test_dashboards_query_logs() -> None:
    assert len(loki_queries()) >= 2, "no dashboard panel reads Loki"


@pytest.mark.parametrize("query", loki_queries())
def test_every_stream_label_is_one_the_pipeline_produces(query: str) -> None:
    produced = loki_index_labels() & resource_attributes_set()
    assert "service_name" in produced, produced
    assert stream_labels(query) <= produced, (query, produced)


@pytest.mark.parametrize("query", loki_queries())
def test_every_label_filter_is_a_field_the_lines_carry(query: str) -> None:
    carried = RECORD_FIELDS | set(formatted_line()) | loki_index_labels()
    assert filter_labels(query) <= carried, (query, carried)


def test_logs_link_to_traces_by_trace_id() -> None:
    loki, tempo = datasources()["loki"], datasources()["tempo"]
    fields = loki["jsonData"]["derivedFields"]
    by_label = [f for f in fields if f.get("matcherType") == "label" and f["matcherRegex"] == "trace_id"]
    assert by_label, "no derived field on Loki's trace_id structured metadata"
    assert all(f["datasourceUid"] == tempo["uid"] for f in by_label)
    assert all(unescape(f["url"]) == "${__value.raw}" for f in by_label)


def test_traces_link_to_logs_by_trace_id() -> None:
    loki, tempo = datasources()["loki"], datasources()["tempo"]
    link = tempo["jsonData"]["tracesToLogsV2"]
    assert link["datasourceUid"] == loki["uid"]
    assert link.get("customQuery") is True
    assert re.search(r'\|\s*trace_id\s*=\s*"\$\{__trace\.traceId\}"', unescape(link["query"])), link["query"]


# --- core/logs.py writes the files ---------------------------------------------------------------------


@pytest.fixture
def root_logger() -> Iterator[logging.Logger]:
    """The root logger, with its handlers and level put back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield root
    for handler in list(root.handlers):
        root.removeHandler(handler)
        if handler not in handlers:
            handler.close()
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_configure_logging_writes_one_json_object_per_line(tmp_path: Path, root_logger: logging.Logger) -> None:
    configure_logging("svc", with_ray=False, log_dir=tmp_path)
    span = NonRecordingSpan(
        SpanContext(int(TRACE_ID, 16), int(SPAN_ID, 16), is_remote=False, trace_flags=TraceFlags(1))
    )
    with trace.use_span(span), log_context(request_id="req-1"):
        logging.getLogger("platform.test").warning("first\nwith a newline")
    logging.getLogger("platform.test").info("second")
    for handler in root_logger.handlers:
        handler.flush()
    lines = read_lines(tmp_path / "svc.log")
    assert [line["message"] for line in lines] == ["first\nwith a newline", "second"]
    assert {line["service"] for line in lines} == {"svc"}
    assert (lines[0]["trace_id"], lines[0]["span_id"], lines[0]["request_id"]) == (TRACE_ID, SPAN_ID, "req-1")
    assert lines[1]["trace_id"] is None


def test_without_a_log_dir_only_stderr(
    tmp_path: Path, root_logger: logging.Logger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The native stack leaves LOG_DIR unset: nothing but the stderr handler, as before."""
    monkeypatch.delenv("LOG_DIR", raising=False)
    monkeypatch.setattr(logs, "get_settings", lambda: Settings(_env_file=None))
    monkeypatch.chdir(tmp_path)
    configure_logging("svc", with_ray=False)
    assert [type(handler) for handler in root_logger.handlers] == [logging.StreamHandler]
    assert not list(tmp_path.iterdir())


def test_log_dir_comes_from_the_settings(
    tmp_path: Path, root_logger: logging.Logger, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LOG_DIR", str(tmp_path / "logs"))
    monkeypatch.setattr(logs, "get_settings", lambda: Settings(_env_file=None))
    configure_logging("from-env", with_ray=False)
    logging.getLogger("platform.test").warning("hello")
    for handler in root_logger.handlers:
        handler.flush()
    assert read_lines(tmp_path / "logs" / "from-env.log")[0]["message"] == "hello"


def test_a_second_writer_follows_the_rotation_of_the_first(tmp_path: Path) -> None:
    """Two processes append to one file; the one that did not rotate it must not write on into
    the rotated copy, nor rotate it a second time."""
    path = tmp_path / "shared.log"
    first, second = (SharedRotatingFileHandler(str(path), max_bytes=2000, backups=3) for _ in range(2))
    for handler in (first, second):
        handler.setFormatter(JsonFormatter("svc"))
    try:
        second.handle(logging.LogRecord("t", logging.INFO, __file__, 1, "before", (), None))
        while not (tmp_path / "shared.log.1").exists():
            first.handle(logging.LogRecord("t", logging.INFO, __file__, 1, "filler", (), None))
        first.handle(logging.LogRecord("t", logging.INFO, __file__, 1, "first-after", (), None))
        second.handle(logging.LogRecord("t", logging.INFO, __file__, 1, "second-after", (), None))
    finally:
        first.close()
        second.close()
    current = [line["message"] for line in read_lines(path)]
    assert current[-2:] == ["first-after", "second-after"], current
    assert not (tmp_path / "shared.log.2").exists(), "the file was rotated once per writer"
    assert "before" in [line["message"] for line in read_lines(tmp_path / "shared.log.1")]


def test_add_log_file_gives_a_dict_config_the_same_file(tmp_path: Path, root_logger: logging.Logger) -> None:
    """MLflow's uvicorn workers are configured by a dictConfig file: the one cluster/mlflow_server.py
    writes, which compose hands on through `add_log_file`."""
    from cluster.mlflow_server import mlflow_log_config

    path = mlflow_log_config(Settings(_env_file=None, state_dir=tmp_path))
    config = json.loads(path.read_text(encoding="utf-8"))
    assert add_log_file(path, "mlflow", None) == path
    assert json.loads(path.read_text(encoding="utf-8")) == config
    add_log_file(path, "mlflow", tmp_path / "logs")
    quieted = [logging.getLogger(name) for name in config["loggers"]]
    access = logging.getLogger("uvicorn.access")
    try:
        logging.config.dictConfig(json.loads(path.read_text(encoding="utf-8")))
        access.info("GET /health 200")
        # A logger no other test or library configures: its line reaches the root handlers.
        logging.getLogger("tests.log_pipeline.root").warning("root line")
    finally:
        for logger in quieted:
            for handler in logger.handlers:
                handler.close()
            logger.handlers.clear()
            logger.propagate = True
    for handler in root_logger.handlers:
        handler.flush()
    lines = read_lines(tmp_path / "logs" / "mlflow.log")
    assert [line["message"] for line in lines] == ["GET /health 200", "root line"]
    assert {line["service"] for line in lines} == {"mlflow"}


def test_serve_writes_its_json_files_into_log_dir_on_every_node(tmp_path: Path) -> None:
    """With LOG_DIR set (compose mounts it on every Ray node) the rendered Serve config sends
    replicas', proxies' and the controller's files there, under a glob the collector tails; without
    it Serve keeps its own session directory."""
    from cluster.apps import render_serve_config

    on = Settings(_env_file=None, state_dir=tmp_path, log_dir="/var/log/platform")
    rendered = yaml.safe_load(render_serve_config(on).read_text())
    logs_dir = rendered["logging_config"]["logs_dir"]
    assert logs_dir == "/var/log/platform/serve" and rendered["logging_config"]["encoding"] == "JSON"
    assert collected(PurePosixPath(logs_dir) / "replica_inference_Ingress_abc.log")
    off = Settings(_env_file=None, state_dir=tmp_path)
    assert "logs_dir" not in yaml.safe_load(render_serve_config(off).read_text())["logging_config"]
