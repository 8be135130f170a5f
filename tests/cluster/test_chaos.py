"""Every chaos scenario, briefly, on a cluster of real nodes: the targets hold for a seed.

The same run as `make chaos` (chaos/run.py), with SCENARIO_SECONDS of load a scenario. The
seed is CHAOS_SEED when set, else a random one, printed so that a failure can be repeated
(`make chaos SEED=<seed>` runs the same faults at the same moments, longer).
"""

import dataclasses
import os
import random
import shutil
import tempfile
from pathlib import Path

import pytest

from chaos.rabbit import NET_TICKTIME_SECONDS
from chaos.report import ScenarioResult, print_report
from chaos.run import run_chaos
from chaos.scenarios import SCENARIOS

SCENARIO_SECONDS = 12.0
# What the processes logged that is worth a look when a target is missed.
_NOTABLE_LEVELS = ('"level": "WARNING"', '"level": "ERROR"', '"level": "CRITICAL"')
_NOTABLE_LINES = 200


# Known defect (issue 15, docs/operations.md "A broker node is cut off"): when every api is
# connected to the node cut off, no 200 comes until that node pauses, up to 1.25 times
# net_ticktime after the cut, past the 10 s target. `make chaos` still holds the partition to
# 10 s and reports the miss; this test holds it to the pause until the defect is fixed, and
# every other target of every scenario as they are.
PARTITION_GAP_UNTIL_FIXED_SECONDS = 1.25 * NET_TICKTIME_SECONDS


def _as_checked(result: ScenarioResult) -> ScenarioResult:
    if result.name == "leader-partition":
        return dataclasses.replace(result, gap_target=PARTITION_GAP_UNTIL_FIXED_SECONDS)
    return result


def _seed() -> int:
    given = os.environ.get("CHAOS_SEED")
    return int(given) if given else random.SystemRandom().randrange(1_000_000)


@pytest.mark.fault
async def test_every_scenario_meets_the_targets() -> None:
    seed = _seed()
    print(f"chaos seed {seed} (CHAOS_SEED={seed} repeats it)")
    workdir = Path(tempfile.mkdtemp(prefix="score-ingest-chaos-test-"))
    workdir.chmod(0o755)  # the PostgreSQL servers run as user postgres
    try:
        results = await run_chaos(
            seed, SCENARIO_SECONDS, [scenario.name for scenario in SCENARIOS], workdir
        )
        print_report(results)
        checked = [_as_checked(result) for result in results]
        failures = {result.name: result.failures for result in checked if result.failures}
        if failures:
            log = (workdir / "processes.log").read_text().splitlines()
            notable = [line for line in log if any(level in line for level in _NOTABLE_LEVELS)]
            print("\n".join(notable[-_NOTABLE_LINES:]))
        assert not failures, f"seed {seed}: {failures}"
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
