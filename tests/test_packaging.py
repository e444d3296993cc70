"""Packaging and deployment: Dockerfile, .dockerignore, docker-compose.yml, deploy/.

No Docker engine is needed: the files are parsed and cross-checked (every dependency, mount,
COPY source and build target exists; the load balancer proxies to the replicated service), the
image's entry point and health checks run against a real server, and the Dask job of the
compose file runs on a real local Dask cluster against a real server.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import numpy as np
import pytest
import yaml
from terrazzo import Client

from core.settings import Settings
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
NGINX = ROOT / "deploy" / "nginx.conf"
ENTRYPOINT = ROOT / "deploy" / "docker-entrypoint.sh"
JOB = ROOT / "deploy" / "dask_job.py"
CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}


# -- helpers: compose interpolation, Dockerfile stages, .dockerignore ------------------------

_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR-default}, applied to every string."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match) -> str:
        name, op, default = match.group(1), match.group(2), match.group(3) or ""
        current = env.get(name)
        if op == ":-" and not current:
            return default
        if op == "-" and current is None:
            return default
        return current or ""

    return _VARIABLE.sub(substitute, value)


def compose(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """docker-compose.yml as compose reads it with `env` (default: no variables set)."""
    return interpolate(yaml.safe_load(COMPOSE.read_text()), env or {})


def depends_on(service: dict[str, Any]) -> dict[str, str]:
    """{dependency: condition} of a service, short or long syntax."""
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return dict.fromkeys(deps, "service_started")
    return {name: (spec or {}).get("condition", "service_started") for name, spec in deps.items()}


def dockerfile_stages() -> list[dict[str, Any]]:
    """[{name, base, instructions: [(KEYWORD, args)]}] with continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages: list[dict[str, Any]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, args = line.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            words = args.split()
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append({"name": name, "base": words[0], "instructions": []})
        elif stages:
            stages[-1]["instructions"].append((keyword, args))
    return stages


def stage(name: str) -> dict[str, Any]:
    matches = [s for s in dockerfile_stages() if s["name"] == name]
    assert matches, f"Dockerfile has no stage {name!r}"
    return matches[0]


def copy_sources(args: str) -> list[str]:
    """Source paths of a COPY (the last word is the destination)."""
    words = [w for w in shlex.split(args) if not w.startswith("--")]
    return words[:-1]


def _ignore_regex(pattern: str) -> re.Pattern:
    pattern = pattern.strip("/")
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out += ".*"
            i += 2
            if pattern.startswith("/", i):
                out += "(?:/)?"
                i += 1
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out)


def dockerignored(path: str) -> bool:
    """Whether .dockerignore leaves `path` out of the build context (last matching rule wins;
    a rule matching a parent folder matches everything under it)."""
    rules = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            negate = line.startswith("!")
            rules.append((negate, _ignore_regex(line.lstrip("!"))))
    parts = Path(path).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for negate, regex in rules:
        if any(regex.fullmatch(p) for p in prefixes):
            ignored = not negate
    return ignored


def load_job() -> ModuleType:
    spec = importlib.util.spec_from_file_location("dask_job", JOB)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without TERRAZZO_* and DASK_* settings, plus `extra`, the venv on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TERRAZZO_", "DASK_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return {**env, **extra}


# -- docker-compose.yml ----------------------------------------------------------------------


def test_compose_runs_replicas_behind_a_load_balancer_and_a_dask_cluster() -> None:
    services = compose()["services"]
    for name in ("catalog", "terrazzo", "lb", "dask-scheduler", "dask-worker", "job"):
        assert name in services, f"docker-compose.yml has no {name!r} service"

    assert int(services["terrazzo"]["deploy"]["replicas"]) >= 2
    assert int(services["dask-worker"]["deploy"]["replicas"]) >= 2
    scaled = compose({"TERRAZZO_REPLICAS": "5", "DASK_WORKERS": "3"})["services"]
    assert int(scaled["terrazzo"]["deploy"]["replicas"]) == 5
    assert int(scaled["dask-worker"]["deploy"]["replicas"]) == 3
    # Replicas publish no host port (they would collide); only the load balancer does.
    assert "ports" not in services["terrazzo"]
    assert any(str(p).endswith(":80") for p in services["lb"]["ports"])
    assert services["lb"]["image"].startswith("nginx:")
    assert "./deploy/nginx.conf:/etc/nginx/nginx.conf:ro" in services["lb"]["volumes"]

    # The Dask services run the client image; the job reaches the service through the lb.
    for name in ("dask-scheduler", "dask-worker", "job"):
        assert services[name]["build"]["target"] == "client"
    assert services["terrazzo"]["build"]["target"] == "server"
    assert "tcp://dask-scheduler:8786" in services["dask-worker"]["command"]
    job_env = services["job"]["environment"]
    assert job_env["TERRAZZO_URL"] == "http://lb"
    assert job_env["DASK_SCHEDULER_ADDRESS"] == "tcp://dask-scheduler:8786"


def test_compose_dependencies_exist_are_acyclic_and_have_health_checks() -> None:
    services = compose()["services"]
    for name, service in services.items():
        for dependency, condition in depends_on(service).items():
            assert dependency in services, f"{name} depends on undefined {dependency!r}"
            assert condition in CONDITIONS, f"{name} -> {dependency}: {condition!r}"
            if condition == "service_healthy":
                assert "healthcheck" in services[dependency], (
                    f"{name} waits for {dependency} to be healthy, which has no healthcheck"
                )
            if condition == "service_completed_successfully":
                assert services[dependency].get("restart", "no") == "no", dependency

    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        assert name not in visiting, f"dependency cycle through {name}"
        if name in order:
            return
        visiting.add(name)
        for dependency in depends_on(services[name]):
            visit(dependency)
        visiting.discard(name)
        order.append(name)

    for name in services:
        visit(name)

    assert depends_on(services["terrazzo"]) == {"catalog": "service_completed_successfully"}
    assert depends_on(services["lb"]) == {"terrazzo": "service_healthy"}
    assert set(depends_on(services["job"])) >= {"lb", "dask-scheduler", "dask-worker"}
    assert all(c == "service_healthy" for c in depends_on(services["job"]).values())
    assert order.index("catalog") < order.index("terrazzo") < order.index("lb") < order.index("job")


def test_compose_mounts_existing_files_and_declared_volumes() -> None:
    for env in ({}, {"TERRAZZO_CATALOG_DIR": "./deploy", "TERRAZZO_CATALOG": "/catalog/x"}):
        spec = compose(env)
        declared = set(spec.get("volumes") or {})
        for name, service in spec["services"].items():
            for volume in service.get("volumes", []):
                source = volume.split(":")[0]
                if source.startswith((".", "/")):
                    assert (ROOT / source).exists(), f"{name} mounts missing {source}"
                else:
                    assert source in declared, f"{name} mounts undeclared volume {source!r}"
            build = service.get("build")
            if build:
                assert (ROOT / build["context"]).is_dir()
                stage(build["target"])  # the target is a stage of the Dockerfile
    # Every replica and the one-shot catalog service see the same catalog path and volume.
    services = compose()["services"]
    catalog = services["catalog"]["environment"]["TERRAZZO_CATALOG"]
    assert services["terrazzo"]["environment"]["TERRAZZO_CATALOG"] == catalog
    assert catalog.startswith("/data/")
    assert "data:/data" in services["catalog"]["volumes"]
    assert "data:/data:ro" in services["terrazzo"]["volumes"]


def test_compose_passes_store_credentials_through_unset_by_default() -> None:
    env = compose()["services"]["terrazzo"]["environment"]
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION"):
        assert name in env and env[name] is None, f"{name} should be passed through, not set"


def test_compose_restarts_what_crashes_and_leaves_one_shots_alone() -> None:
    """A replica whose server process dies (a native crash in it, or in its supervisor) is
    restarted by Docker; the one-shot services are not (they would rerun for ever)."""
    services = compose()["services"]
    for name in ("terrazzo", "lb", "dask-scheduler", "dask-worker"):
        assert services[name].get("restart") in ("unless-stopped", "always", "on-failure"), name
    for name in ("catalog", "job"):
        assert services[name].get("restart") == "no", name
    server = services["terrazzo"]
    # tini as PID 1: it forwards SIGTERM to the server and reaps the compute workers of a
    # server process that died, so a crash never leaves zombies behind in the container.
    assert server.get("init") is True
    assert server["environment"]["TERRAZZO_WORKERS"] == "1"
    workers = compose({"TERRAZZO_WORKERS": "3"})["services"]["terrazzo"]["environment"]
    assert workers["TERRAZZO_WORKERS"] == "3"


def test_the_image_runs_the_server_as_its_main_process() -> None:
    """The restart policy watches the container's main process: the entry point must exec the
    server (a shell left waiting on it would outlive a crash and hide it), in exec form."""
    entrypoint = dict(stage("server")["instructions"])["ENTRYPOINT"]
    assert json.loads(entrypoint) == ["terrazzo-entrypoint"]
    script = ENTRYPOINT.read_text()
    serve = script[script.index("    serve)") : script.index(";;", script.index("    serve)"))]
    assert 'exec terrazzo serve "$@"' in serve


def test_compose_file_passes_docker_compose_config() -> None:
    """The real parser and schema: the Compose v2 plugin, or v1 (make setup installs v1)."""
    commands = []
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
        if probe.returncode == 0:
            commands.append(["docker", "compose", "config", "--quiet"])
    if shutil.which("docker-compose"):
        commands.append(["docker-compose", "config", "--quiet"])
    assert commands, "no docker compose / docker-compose here: run `make setup` (installs it)"
    for command in commands:
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, f"{shlex.join(command)}: {result.stderr}"


# -- Dockerfile and .dockerignore ------------------------------------------------------------


def test_dockerfile_is_multi_stage_and_runs_as_a_non_root_user() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2
    names = {s["name"] for s in stages}
    assert {"client", "server"} <= names
    assert stages[-1]["name"] == "server", "a plain `docker build` must give the service"
    for target in ("client", "server"):
        users = [a for k, a in stage(target)["instructions"] if k == "USER"]
        assert users, f"stage {target} sets no USER"
        assert users[-1].split(":")[0] not in ("root", "0")
    for s in stages:
        for keyword, args in s["instructions"]:
            source = re.search(r"--from=(\S+)", args)
            if keyword == "COPY" and source:
                assert source.group(1) in names, f"COPY --from unknown stage {source.group(1)}"


def test_dockerfile_installs_server_and_client_with_the_constraints() -> None:
    installs = {
        s["name"]: [a for k, a in s["instructions"] if k == "RUN" and "pip install" in a]
        for s in dockerfile_stages()
    }
    server = " ".join(installs["build-server"])
    client = " ".join(installs["build-client"])
    for command in (server, client):
        assert "-c constraints.txt" in command
    assert re.search(r"pip install -c constraints.txt \./client \.(\s|$)", server)
    assert '"./client[xarray]" distributed' in client
    # Scheduler, workers and the job share these versions: each must be pinned.
    pinned = {
        line.split("==")[0].strip().lower()
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if "==" in line
    }
    for package in ("dask", "distributed", "xarray", "numpy", "httpx", "cloudpickle", "msgpack"):
        assert package in pinned, f"{package} is not pinned in constraints.txt"

    server_stage = dict(stage("server")["instructions"])
    assert "HEALTHCHECK" in server_stage and "/healthz" in server_stage["HEALTHCHECK"]
    assert "8000" in server_stage["EXPOSE"].split()
    # The compose job runs the script where the client stage puts it.
    job_copy = [a for k, a in stage("client")["instructions"] if k == "COPY" and "dask_job" in a]
    destination = shlex.split(job_copy[0])[-1]
    assert compose()["services"]["job"]["command"] == ["python", destination]


def test_every_copied_file_exists_and_is_in_the_build_context() -> None:
    sources = [
        src
        for s in dockerfile_stages()
        for keyword, args in s["instructions"]
        if keyword in ("COPY", "ADD") and "--from=" not in args
        for src in copy_sources(args)
    ]
    assert "deploy/docker-entrypoint.sh" in sources and "client" in sources
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: no such file"
        assert not dockerignored(source), f"COPY {source}: excluded by .dockerignore"
    for heavy in (".venv", ".git", "data", "tests", "client/terrazzo.egg-info", "app/__pycache__"):
        assert dockerignored(heavy), f"{heavy} should stay out of the build context"


def test_the_server_wheel_ships_the_data_files_of_its_packages() -> None:
    """The image installs terrazzo-server as a wheel, not the source tree: setuptools puts the
    .py files of app*/core* in it, and other files only when [tool.setuptools.package-data]
    lists them (static files missing from the image fail there only, not in a source checkout).
    """
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    package_data = meta.get("tool", {}).get("setuptools", {}).get("package-data", {})
    missing = []
    for package in ("app", "core"):
        root = ROOT / package
        patterns = [*package_data.get(package, []), *package_data.get("*", [])]
        shipped = {
            Path(found).as_posix()
            for pattern in patterns
            for found in glob.glob(pattern, root_dir=root, recursive=True)
        }
        for path in sorted(root.rglob("*")):
            if not path.is_file() or path.suffix in (".py", ".pyc"):
                continue
            if "__pycache__" in path.parts:
                continue
            if path.relative_to(root).as_posix() not in shipped:
                missing.append(path.relative_to(ROOT).as_posix())
    assert not missing, (
        f"not in the wheel, so not in the image: {missing}; list them in pyproject.toml's "
        "[tool.setuptools.package-data]"
    )


# -- nginx -----------------------------------------------------------------------------------


def test_nginx_proxies_to_the_replicated_service_via_docker_dns() -> None:
    text = re.sub(r"#.*", "", NGINX.read_text())
    directives = {}
    for statement in re.split(r"[;{}]", text):
        words = statement.split()
        if words:
            directives.setdefault(words[0], []).append(words[1:])

    assert ["127.0.0.11", "valid=10s", "ipv6=off"] in directives["resolver"]
    # proxy_pass through a variable: the name is resolved per request, so scaling works.
    (target,) = directives["proxy_pass"]
    assert target[0].startswith("$")
    variables = {w[0]: w[1] for w in directives["set"]}
    upstream = httpx.URL(variables[target[0]])
    services = compose()["services"]
    assert upstream.host == "terrazzo" and upstream.host in services
    assert "deploy" in services[upstream.host]
    assert upstream.port == int(services[upstream.host]["expose"][0])
    assert directives["listen"] == [["80"]]

    assert ["off"] in directives["proxy_buffering"]
    assert ["1.1"] in directives["proxy_http_version"]
    seconds = int(directives["proxy_read_timeout"][0][0].rstrip("s"))
    assert seconds >= Settings().chunk_timeout_s * 2
    body = directives["client_max_body_size"][0][0]
    assert int(body.rstrip("m")) * 2**20 > Settings().max_body_bytes


def test_nginx_conf_passes_nginx_t(tmp_path: Path) -> None:
    """The real parser (make setup installs nginx)."""
    assert shutil.which("nginx"), "no nginx here: run `make setup` (installs it)"
    result = subprocess.run(
        ["nginx", "-t", "-c", str(NGINX), "-g", f"pid {tmp_path}/nginx.pid;"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr


# -- the image's entry point and health checks, against a real server -----------------------


def test_entrypoint_refuses_a_missing_catalog_instead_of_serving_the_demo() -> None:
    result = subprocess.run(
        ["sh", str(ENTRYPOINT), "serve"],
        env=clean_env(TERRAZZO_CATALOG="/nowhere/items.parquet"),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "TERRAZZO_CATALOG=/nowhere/items.parquet is not a file" in result.stderr


@pytest.fixture(scope="module")
def entrypoint_server(demo_catalog: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """The image's default command (`serve`, no TERRAZZO_CATALOG) with the demo directory."""
    port = free_port()
    env = clean_env(
        TERRAZZO_DEMO_DIR=str(demo_catalog.parent),
        TERRAZZO_HOST="127.0.0.1",
        TERRAZZO_PORT=str(port),
    )
    proc = subprocess.Popen(
        ["sh", str(ENTRYPOINT)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the entry point did not serve in 60 s"
            time.sleep(0.2)
        yield url, env
    finally:
        proc.terminate()
        try:
            proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


def test_entrypoint_serves_the_demo_and_health_checks_pass(
    entrypoint_server: tuple[str, dict[str, str]], demo_catalog: Path
) -> None:
    url, env = entrypoint_server
    info = httpx.get(url + "/info", timeout=10).json()
    assert Path(info["path"]).resolve() == demo_catalog.resolve()
    assert info["items"] > 0

    healthcheck = dict(stage("server")["instructions"])["HEALTHCHECK"]
    command = json.loads(healthcheck[healthcheck.index("CMD") + 3 :])
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr

    port = httpx.URL(url).port
    test = compose()["services"]["terrazzo"]["healthcheck"]["test"]
    assert test[0] == "CMD"
    command = [part.replace(":8000/", f":{port}/") for part in test[1:]]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


def test_entrypoint_runs_supervised_server_processes_from_the_environment(
    demo_catalog: Path,
) -> None:
    """TERRAZZO_WORKERS=2 through the image's entry point: two server processes under
    uvicorn's supervisor; one killed is replaced and the service keeps answering."""
    import psutil

    port = free_port()
    env = clean_env(
        TERRAZZO_DEMO_DIR=str(demo_catalog.parent),
        TERRAZZO_HOST="127.0.0.1",
        TERRAZZO_PORT=str(port),
        TERRAZZO_WORKERS="2",
        TERRAZZO_COMPUTE_WORKERS="1",
    )
    proc = subprocess.Popen(
        ["sh", str(ENTRYPOINT)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"

    def servers() -> list[int]:
        pids = []
        for child in psutil.Process(proc.pid).children():
            try:
                if "spawn_main" in " ".join(child.cmdline()):
                    pids.append(child.pid)
            except psutil.Error:  # a dead one not reaped yet (a zombie) or gone
                pass
        return pids

    def answers() -> bool:
        try:
            return httpx.get(url + "/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        deadline = time.monotonic() + 60
        while not (answers() and len(servers()) == 2):
            assert proc.poll() is None, "the entry point exited"
            assert time.monotonic() < deadline, "two server processes did not serve in 60 s"
            time.sleep(0.2)
        first = servers()
        os.kill(first[0], 9)
        deadline = time.monotonic() + 30
        while not (answers() and len(set(servers()) - set(first)) == 1):
            assert time.monotonic() < deadline, "the killed server process was not replaced"
            time.sleep(0.2)
        assert proc.poll() is None
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_entrypoint_catalog_mode_keeps_an_existing_demo(demo_catalog: Path) -> None:
    before = demo_catalog.stat().st_mtime_ns
    result = subprocess.run(
        ["sh", str(ENTRYPOINT), "catalog"],
        env=clean_env(TERRAZZO_DEMO_DIR=str(demo_catalog.parent)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert f"catalog ready at {demo_catalog}" in result.stdout
    assert demo_catalog.stat().st_mtime_ns == before


# -- the Dask job, on a real local cluster against a real server -----------------------------


def test_job_options_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    job = load_job()
    for name in list(os.environ):
        if name.startswith("TERRAZZO_"):
            monkeypatch.delenv(name)
    assert job.options_from_env() == {"api_key": None, "datetime": None}
    monkeypatch.setenv("TERRAZZO_JOB_BBOX", "1, 2, 3, 4")
    monkeypatch.setenv("TERRAZZO_JOB_ASSETS", "visual, dem")
    monkeypatch.setenv("TERRAZZO_JOB_GROUP_BY", "none")
    monkeypatch.setenv("TERRAZZO_JOB_RESOLUTION", "30")
    monkeypatch.setenv("TERRAZZO_JOB_DATETIME", "")
    options = job.options_from_env()
    assert options["bbox"] == [1.0, 2.0, 3.0, 4.0]
    assert options["assets"] == ["visual", "dem"]
    assert options["group_by"] is None and options["datetime"] is None
    assert options["resolution"] == 30.0
    monkeypatch.setenv("TERRAZZO_JOB_BBOX", "1,2,3")
    with pytest.raises(ValueError, match="TERRAZZO_JOB_BBOX"):
        job.options_from_env()


def test_dask_job_on_a_local_cluster_equals_an_eager_read(
    entrypoint_server: tuple[str, dict[str, str]],
) -> None:
    """deploy/dask_job.py against the service started as the image starts it."""
    import distributed

    job = load_job()
    url, _ = entrypoint_server
    area = dict(resolution=120.0, chunk_size=128, assets=["dem"], group_by="day")
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    ) as cluster:
        result = job.main(url, cluster.scheduler_address, min_workers=2, **area)
        script = subprocess.run(
            [sys.executable, str(JOB)],
            env=clean_env(
                TERRAZZO_URL=url,
                DASK_SCHEDULER_ADDRESS=cluster.scheduler_address,
                TERRAZZO_JOB_RESOLUTION="120",
                TERRAZZO_JOB_CHUNK_SIZE="128",
                TERRAZZO_JOB_MIN_WORKERS="2",
            ),
            capture_output=True,
            text=True,
            timeout=120,
        )
        empty = job.main(
            url, cluster.scheduler_address, bbox=(100000, 100000, 107680, 103840), **area
        )

    with Client(url) as client:
        eager = client.read(
            list(job.DEFAULT_BBOX),
            crs=job.DEFAULT_CRS,
            dtype="float32",
            progress=False,
            **area,
        )
    values = eager.values.astype("float64")
    valid = np.isfinite(values)

    assert result["workers"] == 2
    assert result["shape"] == list(values.shape) == [2, 1, 256, 512]
    assert result["chunks"] == 8
    assert sum(result["chunk_reads_per_worker"].values()) == result["chunks"]
    assert result["time"] == ["2024-06-01T00:00:00", "2024-09-01T00:00:00"]
    assert result["valid_pixels"] == int(valid.sum()) > 0
    assert np.isfinite(result["mean"])
    np.testing.assert_allclose(result["mean"], values[valid].mean(), rtol=1e-9)
    assert result["min"] == values[valid].min() and result["max"] == values[valid].max()
    per_time = [values[t][np.isfinite(values[t])].mean() for t in range(values.shape[0])]
    np.testing.assert_allclose(result["mean_per_time"], per_time, rtol=1e-9)

    # `python deploy/dask_job.py`, as the compose `job` service runs it: the same numbers.
    assert script.returncode == 0, script.stderr
    printed = json.loads(script.stdout)
    assert printed["valid_pixels"] == result["valid_pixels"]
    np.testing.assert_allclose(printed["mean"], result["mean"], rtol=1e-12)

    # Outside the catalog: nothing valid, no NaN in the JSON.
    assert empty["valid_pixels"] == 0 and empty["mean"] is None and empty["min"] is None
    json.dumps(empty, allow_nan=False)
