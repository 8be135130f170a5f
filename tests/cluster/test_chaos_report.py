"""The chaos report's arithmetic: the longest gap without a 200, the targets a result misses."""

import dataclasses

import pytest

from chaos.report import (
    GAP_TARGET_BROKER_SECONDS,
    GAP_TARGET_DATABASE_SECONDS,
    ScenarioResult,
    as_json,
    longest_gap,
)

MET = ScenarioResult(
    name="leader-kill",
    fault="kill -9 node 1",
    run_id="chaos-1-leader-kill-abc",
    seconds=20.0,
    attempts=120,
    ok=100,
    unavailable=20,
    other={},
    abandoned=0,
    accepted=700,
    stored=700,
    lost=0,
    duplicated=0,
    dead_lettered=0,
    longest_gap=GAP_TARGET_BROKER_SECONDS,
    gap_target=GAP_TARGET_BROKER_SECONDS,
)


def test_the_longest_gap_is_between_two_200s() -> None:
    assert longest_gap(0.0, 10.0, [1.0, 2.0, 7.5, 9.0]) == pytest.approx(5.5)


def test_the_longest_gap_counts_from_the_start_and_to_the_stop() -> None:
    assert longest_gap(0.0, 10.0, [6.0, 7.0]) == pytest.approx(6.0)
    assert longest_gap(0.0, 10.0, [1.0, 2.0]) == pytest.approx(8.0)


def test_without_a_200_the_gap_is_the_whole_load() -> None:
    assert longest_gap(3.0, 15.0, []) == pytest.approx(12.0)


def test_the_times_need_not_come_in_order() -> None:
    assert longest_gap(0.0, 10.0, [9.0, 1.0, 5.0]) == pytest.approx(4.0)


def test_a_result_on_its_targets_misses_none() -> None:
    assert MET.failures == []
    assert as_json([MET], seed=1)["passed"] is True


@pytest.mark.parametrize(
    ("change", "said"),
    [
        ({"lost": 1}, "1 scores answered 200 were never stored"),
        ({"duplicated": 2}, "2 scores were stored twice"),
        ({"dead_lettered": 3}, "3 messages were dead-lettered"),
        ({"longest_gap": GAP_TARGET_BROKER_SECONDS + 0.1}, "no 200 for 10.1s (target 10s)"),
        ({"ok": 0}, "no request was answered 200"),
        ({"other": {"status 500": 2, "ReadError": 3}}, "2 answers were neither 200 nor 503"),
        ({"fault_failed": "the fault failed: boom"}, "the fault failed: boom"),
    ],
)
def test_each_missed_target_is_said(change: dict[str, object], said: str) -> None:
    result = dataclasses.replace(MET, **change)  # type: ignore[arg-type]
    assert result.failures == [said]
    document = as_json([MET, result], seed=1, duration=20.0)
    assert document["passed"] is False
    assert document["scenarios"][1]["failures"] == [said]


def test_a_dropped_connection_is_no_missed_target() -> None:
    assert dataclasses.replace(MET, other={"ConnectError": 4, "ReadError": 1}).failures == []


def test_the_database_failover_may_go_longer_without_a_200() -> None:
    result = dataclasses.replace(
        MET, longest_gap=25.0, gap_target=GAP_TARGET_DATABASE_SECONDS, name="db-failover"
    )
    assert result.failures == []
