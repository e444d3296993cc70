"""The `terrazzo` command line, run as a user runs it (subprocesses, real files)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import duckdb
import httpx
import morecantile

from tests.conftest import Server


def terrazzo(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def test_help_lists_commands() -> None:
    out = terrazzo("--help")
    assert out.returncode == 0
    for command in ("serve", "index", "demo", "plan", "bench"):
        assert command in out.stdout


def test_index_ndjson_to_geoparquet(demo_catalog: Path, tmp_path: Path) -> None:
    source = demo_catalog.parent / "items.ndjson"
    out = tmp_path / "copy.parquet"
    result = terrazzo("index", str(source), "-o", str(out), "--row-group-size", "10")
    assert result.returncode == 0, result.stderr
    expected = len(source.read_text().splitlines())
    assert f"wrote {expected} items" in result.stdout
    count = duckdb.connect().execute("select count(*) from read_parquet(?)", [str(out)]).fetchone()
    assert count == (expected,)


def test_index_rejects_non_items(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"hello": "world"}))
    result = terrazzo("index", str(bad), "-o", str(tmp_path / "x.parquet"))
    assert result.returncode == 2
    assert "terrazzo index:" in result.stderr


def test_plan_prints_items_levels_windows(demo_catalog: Path) -> None:
    t = morecantile.tms.get("WebMercatorQuad").tile(6.0, 45.0, 11)
    result = terrazzo("plan", f"{t.z}/{t.x}/{t.y}", "--catalog", str(demo_catalog))
    assert result.returncode == 0, result.stderr
    assert "demo-32631" in result.stdout and "demo-32632" in result.stdout
    assert "level" in result.stdout and "window" in result.stdout
    as_json = terrazzo("plan", f"{t.z}/{t.x}/{t.y}", "--catalog", str(demo_catalog), "--json")
    assert len(json.loads(as_json.stdout)["items"]) >= 2


def test_serve_without_catalog_says_how(tmp_path: Path) -> None:
    result = terrazzo("serve", env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert result.returncode == 2
    assert "TERRAZZO_CATALOG" in result.stderr


def test_every_setting_is_a_serve_flag() -> None:
    from core.settings import Settings

    out = terrazzo("serve", "--help")
    assert out.returncode == 0
    for name in Settings.model_fields:
        assert f"--{name.replace('_', '-')}" in out.stdout, name
        assert f"TERRAZZO_{name.upper()}" in " ".join(out.stdout.split()), name


def test_flags_win_over_env_and_secrets_are_masked(demo_catalog: Path) -> None:
    server = Server(
        demo_catalog,
        env={"TERRAZZO_MAX_TILESIZE": "512", "TERRAZZO_API_KEY": "hunter2"},
        args=("--max-tilesize", "128"),
    )
    try:
        r = httpx.get(
            f"{server.url}/tiles/0/0/0", params={"tilesize": 256}, headers={"X-API-Key": "hunter2"}
        )
        assert r.status_code == 400 and "128" in r.json()["detail"]
    finally:
        output = server.stop()
    first = output.splitlines()[0]
    settings = json.loads(first.removeprefix("terrazzo settings: "))
    assert settings["max_tilesize"] == 128 and settings["api_key"] == "***"
    assert "hunter2" not in output


def test_bench_runs_the_source_tree_benchmarks() -> None:
    out = terrazzo("bench", "search", "--help")
    assert out.returncode == 0, out.stderr
    assert "1,000,000" in out.stdout
    assert terrazzo("bench", "nope").returncode == 2
