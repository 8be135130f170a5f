"""Every chaos scenario, briefly, on a cluster of real nodes: the targets hold for a seed.

The same run as `make chaos` (chaos/run.py) on the session's RabbitMQ cluster, with
SCENARIO_SECONDS of load a scenario and shorter faults (HOLDS; a partition still outlasts the
10 s target, so that an api waiting for the cut-off node would miss it). The seed is
CHAOS_SEED when set, else a random one, printed so that a failure can be repeated
(`make chaos SEED=<seed>` runs the same faults at the same moments, longer).
"""

import os
import random
import shutil
import tempfile
from pathlib import Path

import pytest

from chaos.rabbit import RabbitCluster
from chaos.report import print_report
from chaos.run import run_chaos
from chaos.scenarios import SCENARIOS, Holds

SCENARIO_SECONDS = 8.0
HOLDS = Holds(node_down=(1.0, 2.0), partition=(11.0, 13.0), promotion=(0.5, 1.5))
# What the processes logged that is worth a look when a target is missed.
_NOTABLE_LEVELS = ('"level": "WARNING"', '"level": "ERROR"', '"level": "CRITICAL"')
_NOTABLE_LINES = 200


def _seed() -> int:
    given = os.environ.get("CHAOS_SEED")
    return int(given) if given else random.SystemRandom().randrange(1_000_000)


@pytest.mark.fault
async def test_every_scenario_meets_the_targets(cluster: RabbitCluster) -> None:
    seed = _seed()
    print(f"chaos seed {seed} (CHAOS_SEED={seed} repeats it)")
    workdir = Path(tempfile.mkdtemp(prefix="score-ingest-chaos-test-"))
    workdir.chmod(0o755)  # the PostgreSQL servers run as user postgres
    try:
        results = await run_chaos(
            seed,
            SCENARIO_SECONDS,
            [scenario.name for scenario in SCENARIOS],
            workdir,
            cluster=cluster,
            holds=HOLDS,
        )
        print_report(results)
        failures = {result.name: result.failures for result in results if result.failures}
        if failures:
            log = (workdir / "processes.log").read_text().splitlines()
            notable = [line for line in log if any(level in line for level in _NOTABLE_LEVELS)]
            print("\n".join(notable[-_NOTABLE_LINES:]))
        assert not failures, f"seed {seed}: {failures}"
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
