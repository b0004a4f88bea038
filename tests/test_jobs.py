"""The example jobs and the schema file editors use stay in step with the code."""

from __future__ import annotations

import json
from pathlib import Path

from batch_engine.manifest.schema import manifest_schema

JOBS = Path(__file__).resolve().parent.parent / "jobs"


def test_committed_schema_is_the_generated_one() -> None:
    """jobs/manifest.schema.json, which the example jobs point editors at, equals `batch-engine schema`."""
    committed = json.loads((JOBS / "manifest.schema.json").read_text(encoding="utf-8"))
    assert committed == manifest_schema(), "run: batch-engine schema > jobs/manifest.schema.json"


def test_every_example_job_points_editors_at_the_schema() -> None:
    """Each manifest in jobs/ starts with the yaml-language-server modeline naming the schema file."""
    for path in sorted(JOBS.glob("*.yaml")):
        first = path.read_text(encoding="utf-8").splitlines()[0]
        assert first == "# yaml-language-server: $schema=manifest.schema.json", path.name
