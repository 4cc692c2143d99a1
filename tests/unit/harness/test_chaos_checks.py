"""The chaos harness's plan and checks on made-up records: each check passes on a clean
history and fails on the fault it is there to catch (a lost or doubled result, a seq
repeated, money created, a dead letter too many)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from harness import chaos
from harness.checks import Check
from topics.codec import encode
from topics.schema import SOURCE_HEADER, Capture, Deposit, Entry, Result, Status, Transfer

T = "x.commands"


def _record(partition: int, offset: int, value: bytes, source: str | None = None) -> Any:
    headers = [] if source is None else [(SOURCE_HEADER, source.encode())]
    return SimpleNamespace(
        topic=T, partition=partition, offset=offset, value=value, headers=headers
    )


def _entry(account: str, seq: int, delta: int, available: int) -> Entry:
    return Entry(account=account, asset="USD", seq=seq, available=available, held=0,
                 delta_available=delta, delta_held=0)  # fmt: skip


def _result(
    command_id: str, kind: str, entries: list[Entry], status: str = "applied", emitted: int = 0
) -> Result:
    return Result(command_id=command_id, account=entries[0].account if entries else "a",
                  kind=kind, status=Status(status), entries=entries, emitted=emitted,
                  at_ms=1)  # fmt: skip


def _history() -> tuple[list[Any], list[tuple[Any, Result]]]:
    """a deposits 100, sends 30 to b (a credit), and one garbage record."""
    deposit = Deposit(command_id="d1", account="a", asset="USD", amount=100)
    transfer = Transfer(command_id="t1", account="a", to="b", asset="USD", amount=30)
    commands = [_record(0, 0, encode(deposit)), _record(0, 1, encode(transfer)),
                _record(0, 2, b"\xff garbage")]  # fmt: skip
    results = [
        (_record(0, 0, b"", "0:0"), _result("d1", "deposit", [_entry("a", 1, 100, 100)])),
        (
            _record(0, 1, b"", "0:1"),
            _result("t1", "transfer", [_entry("a", 2, -30, 70)], emitted=1),
        ),
        (_record(1, 0, b""), _result("a/t1/credit", "credit", [_entry("b", 1, 30, 30)])),
    ]
    return commands, results


def test_the_plan_is_reproducible_and_draws_every_kind_before_repeating() -> None:
    first = chaos.plan(7, 600, 12)
    assert first == chaos.plan(7, 600, 12)
    assert first != chaos.plan(8, 600, 12)
    assert set(f.kind for f in first[: len(chaos.KINDS)]) == set(chaos.KINDS)
    assert all(60 <= f.at_s <= 480 for f in first)
    assert [f.at_s for f in first] == sorted(f.at_s for f in first)


def test_a_clean_history_passes_every_check() -> None:
    commands, results = _history()
    checks = chaos._check_results(commands, [], results)
    assert [c.ok for c in checks] == [True, True, False]  # the credit was never written
    internal = [SimpleNamespace(topic="x.internal", partition=1, offset=0, headers=[],
                                value=b'{"kind":"credit","command_id":"a/t1/credit","account":"b",'
                                      b'"asset":"USD","amount":30,"origin_command_id":"t1",'
                                      b'"origin_account":"a"}')]  # fmt: skip
    assert all(c.ok for c in chaos._check_results(commands, internal, results))
    assert chaos._check_seq(results).ok
    assert chaos._check_conservation(results).ok


def test_a_lost_or_doubled_result_is_caught() -> None:
    commands, results = _history()
    lost = chaos._check_results(commands, [], results[1:])[0]
    assert not lost.ok and "1 without a result" in lost.detail
    doubled = chaos._check_results(commands, [], [results[0], *results])[0]
    assert not doubled.ok and "1 with several" in doubled.detail


def test_a_second_decision_for_one_id_is_caught() -> None:
    commands, results = _history()
    commands.append(_record(0, 3, commands[0].value))  # the deposit again
    again = (_record(0, 3, b"", "0:3"), _result("d1", "deposit", [_entry("a", 3, 100, 170)]))
    check = chaos._check_results(commands, [], [*results, again])[1]
    assert not check.ok
    duplicate = (_record(0, 3, b"", "0:3"), _result("d1", "deposit", [], status="duplicate"))
    assert chaos._check_results(commands, [], [*results, duplicate])[1].ok


def test_a_seq_applied_twice_or_skipped_is_caught() -> None:
    _, results = _history()
    twice = (results[0][0], _result("t2", "transfer", [_entry("a", 2, -1, 69)]))
    assert not chaos._check_seq([*results, twice]).ok
    skipped = (results[0][0], _result("t3", "transfer", [_entry("a", 4, -1, 69)]))
    assert not chaos._check_seq([*results, skipped]).ok


def test_money_made_or_lost_inside_the_engine_is_caught() -> None:
    commands, results = _history()
    no_credit = results[:2]
    check = chaos._check_conservation(no_credit)
    assert not check.ok and "internal net -30" in check.detail
    # A capture paid out of the system is an outflow, not a loss.
    capture = Capture(command_id="c1", account="b", hold_id="h", amount=30)
    commands.append(_record(0, 3, encode(capture)))
    paid = (_record(1, 1, b""), _result("c1", "capture", [_entry("b", 2, -30, 0)]))
    assert chaos._check_conservation([*results, paid]).ok


def test_dead_letters_must_be_exactly_the_garbage() -> None:
    commands, _ = _history()
    letter = SimpleNamespace(source_topic=T, source_partition=0, source_offset=2)
    assert chaos._check_dead_letters(commands, [letter]).ok  # type: ignore[list-item]
    assert not chaos._check_dead_letters(commands, []).ok
    assert not chaos._check_dead_letters(commands, [letter, letter]).ok  # type: ignore[list-item]


def test_the_report_says_which_faults_were_not_injected() -> None:
    run = chaos.Run(seed=1, duration_s=50, rate=300, plan=chaos.plan(1, 50, 3, chaos.SHORT_KINDS))
    run.carried_out = ["kill9", "broker_restart"]
    run.skipped = ["t+20.0s sigstop: no live worker"]
    report = chaos.render(run)
    assert "injected: kill9, broker_restart; NOT injected: t+20.0s sigstop" in report


def test_one_id_on_two_accounts_is_two_decisions_and_a_forwarded_copy_is_not_a_record() -> None:
    commands, results = _history()
    other = Deposit(command_id="d1", account="c", asset="USD", amount=5)
    # The client's record on a wrong partition, and the engine's copy on the right one.
    commands += [_record(2, 0, encode(other)), _record(1, 7, encode(other), "2:0")]
    results.append((_record(1, 1, b"", "2:0"), _result("d1", "deposit", [_entry("c", 1, 5, 5)])))
    checks = {c.name: c for c in chaos._check_results(commands, [], results)}
    assert checks["exactly one result per command record"].ok, checks
    assert checks["one decision per (account, command id)"].ok, checks


def test_a_run_with_a_fault_not_injected_fails() -> None:
    """A planned fault that was skipped at run time leaves a run with less chaos than its
    plan: every check may hold, the run still fails (and `tally chaos` exits 1)."""
    run = chaos.Run(seed=1, duration_s=50, rate=300, plan=chaos.plan(1, 50, 3, chaos.SHORT_KINDS))
    run.checks = [Check("a check", True, "fine")]
    run.carried_out = ["kill9", "broker_restart", "sigstop"]
    assert run.ok
    run.carried_out = ["kill9", "broker_restart"]
    run.skipped = ["t+20.0s sigstop: no live worker"]
    assert not run.ok
    assert "FAILED" in chaos.render(run).splitlines()[0]
