"""The deploy recipes (deploy/): what can be checked without Kubernetes or Docker is checked.

Each recipe's command must be one the CLI accepts and name a manifest that validates; the Kubernetes
CronJob must forbid overlapping nights and map the exit codes as README says; the compose file's three
workers, run here as processes with the recipe's own command and environment (the database and the
simulator swapped for the test's), must finish the demo run together.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from batch_engine.cli import _parser
from batch_engine.manifest import load_manifest
from batch_engine.sim import Simulator
from batch_engine.store.postgres import drop_run
from tests.procs import engine, engine_env
from tests.test_resume import EXIT_FAILED_ITEMS, EXIT_OK, check_out_dir, sim_config

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]


def kind(docs: list[dict[str, Any]], name: str) -> dict[str, Any]:
    found = [doc for doc in docs if doc["kind"] == name]
    assert len(found) == 1, [doc["kind"] for doc in docs]
    return found[0]


def check_command(args: list[str]) -> Any:
    """The arguments parse as batch-engine's, and a manifest they name validates."""
    parsed = _parser().parse_args(args)
    if parsed.command == "run":
        load_manifest(ROOT / parsed.manifest)
    return parsed


def test_the_dockerfile_copies_what_exists_and_installs_both_extras() -> None:
    text = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    for source in re.findall(r"^COPY (.+) \S+$", text, flags=re.M):
        for name in source.split():
            assert (ROOT / name).exists(), name
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    for extra in re.findall(r"\.\[([a-z0-9,]+)\]", text)[0].split(","):
        assert re.search(rf"^{extra} = \[", pyproject, flags=re.M), extra
    assert 'ENTRYPOINT ["batch-engine"]' in text  # exec form: SIGTERM reaches the engine


def test_the_cronjob_never_overlaps_shares_one_run_and_maps_the_exit_codes() -> None:
    docs = documents(DEPLOY / "kubernetes" / "cronjob.yaml")
    cron = kind(docs, "CronJob")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    job = cron["spec"]["jobTemplate"]["spec"]
    assert job["completionMode"] == "Indexed"
    assert job["completions"] == job["parallelism"] >= 2
    rules = {
        value: rule["action"]
        for rule in job["podFailurePolicy"]["rules"]
        for value in rule.get("onExitCodes", {}).get("values", [])
    }
    assert rules == {2: "FailJob", 1: "FailIndex"}  # 3 (stopped early) and a kill are retried
    pod = job["template"]["spec"]
    assert pod["restartPolicy"] == "Never"  # podFailurePolicy requires it
    (container,) = pod["containers"]
    parsed = check_command(container["args"])
    assert parsed.command == "run"
    assert parsed.journal is None  # from the Secret: the URL holds no password on the command line
    secret = kind(documents(DEPLOY / "kubernetes" / "secret.yaml"), "Secret")
    assert container["envFrom"] == [{"secretRef": {"name": secret["metadata"]["name"]}}]
    assert {"GPTPROTO_API_KEY", "BATCH_ENGINE_JOURNAL"} <= set(secret["stringData"])
    claim = kind(docs, "PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # every pod writes the same out dir
    (volume,) = pod["volumes"]
    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert str(parsed.out).startswith(container["volumeMounts"][0]["mountPath"])
    assert pod["terminationGracePeriodSeconds"] > 30  # the engine's grace period, then its reports


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text(encoding="utf-8"))
    return loaded


def workers(spec: Mapping[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for name, service in spec["services"].items():
        if name.startswith("worker-"):
            yield name, service


def test_the_compose_file_runs_postgres_the_simulator_and_three_workers_of_one_run() -> None:
    spec = compose()
    found = dict(workers(spec))
    assert len(found) == 3
    for service in found.values():
        parsed = check_command(service["command"])
        assert parsed.base_url == "http://simulator:8080"
        assert service["environment"]["BATCH_ENGINE_JOURNAL"].startswith("postgresql://")
        assert service["depends_on"]["postgres"] == {"condition": "service_healthy"}
    assert len({str(service["command"]) for service in found.values()}) == 1  # the same command on each
    simulator = check_command(spec["services"]["simulator"]["command"])
    assert (simulator.host, simulator.advertise, simulator.port) == ("0.0.0.0", "simulator", 8080)
    status = check_command(spec["services"]["status"]["command"])
    assert status.target == load_manifest(ROOT / "jobs" / "demo.yaml").name


@pytest.mark.anyio
@pytest.mark.slow
async def test_the_compose_workers_finish_the_demo_run_together(tmp_path: Path, pg_url: str) -> None:
    """The three compose workers' command and environment, run here as processes (the database and the
    simulator swapped for the test's, the volume for a folder, polls made fast): the demo run ends done,
    each item once."""
    service = dict(workers(compose()))["worker-1"]
    manifest = load_manifest(ROOT / "jobs" / "demo.yaml")
    drop_run(pg_url, manifest.name)
    out = tmp_path / "out"
    async with Simulator(sim_config(api_key=None, inference_polls=2)) as sim:
        swapped = {
            "http://simulator:8080": sim.base_url,
            "jobs/demo.yaml": str(ROOT / "jobs" / "demo.yaml"),  # the image's /app is this checkout
        }
        args = [swapped.get(arg, arg) for arg in service["command"]]
        where = args.index("--out") + 1
        run_out = args[where] = str(out / Path(args[where]).relative_to("/out"))
        args += ["--rate", "40", "--poll-after", "0.05", "--poll-interval", "0.05", "--log-every", "0.5"]
        env = {**service["environment"], "BATCH_ENGINE_JOURNAL": pg_url}
        env.pop("PGPASSWORD")
        run_env = engine_env(key=env.pop("GPTPROTO_API_KEY"), **env)
        try:
            async with engine(args, env=run_env) as a, engine(args, env=run_env) as b, engine(
                args, env=run_env
            ) as c:
                codes = [await proc.wait() for proc in (a, b, c)]
        finally:
            drop_run(pg_url, manifest.name)
        assert all(code in (EXIT_OK, EXIT_FAILED_ITEMS) for code in codes), [p.tail() for p in (a, b, c)]
        ids = [{"id": item.id, "prompt": item.spec["prompt"]} for item in manifest.iter_items()]
        check_out_dir(Path(run_out), ids, sim)
        assert sim.stats.duplicate_bodies == 0
