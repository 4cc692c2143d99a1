"""The chaos run's checks over what every topic holds, read back from offset 0: one
result per command record, one decision per (account, command id), one result per
internal command, seq 1..n per balance, conservation per asset, dead letters exactly
the garbage. Pure functions of the records: the unit tests feed them made-up histories."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from harness.checks import Check
from harness.collector import implied_ids
from topics.codec import Undecodable, decode_command
from topics.money import conservation, flows_of, holdings
from topics.schema import DeadLetter, Result, Status, source, source_in


def _is_decision(result: Result) -> bool:
    return result.status is not Status.DUPLICATE and not (
        result.reason is not None and result.reason.value == "command_id_reused"
    )


@dataclass
class _Answers:
    """The result events indexed: by the record they answer (tally-source), by command
    id, and by (account, command id)."""

    by_source: Counter[bytes] = field(default_factory=Counter)
    by_id: dict[str, list[Result]] = field(default_factory=lambda: defaultdict(list))
    by_key: dict[tuple[str, str], list[Result]] = field(default_factory=lambda: defaultdict(list))


def _check_results(
    commands: list[Any], internal: list[Any], results: list[tuple[Any, Result]]
) -> list[Check]:
    """One result per command record; one decision per client (account, command id);
    one result per internal command, and every internal command a decision implies
    exists. A copy the engine forwarded from a wrong partition is not a record of its
    own: its result names (tally-source) the record the client produced."""
    answers = _Answers()
    for record, result in results:
        found = source_in(record.headers)
        if found is not None:
            answers.by_source[found] += 1
        answers.by_id[result.command_id].append(result)
        answers.by_key[(result.account, result.command_id)].append(result)
    answerable, garbage = _answerable(commands)
    return [
        _one_result_each(answers, answerable, garbage),
        _one_decision(answers, set(answerable.values())),
        _one_result_per_internal(answers, internal),
    ]


def _answerable(commands: list[Any]) -> tuple[dict[bytes, tuple[str, str]], int]:
    """The client's records that must be answered, by source -> (account, command id),
    and the number of garbage records (forwarded copies are neither)."""
    garbage = 0
    answerable: dict[bytes, tuple[str, str]] = {}
    for record in commands:
        if source_in(record.headers) is not None:
            continue  # a forwarded copy
        decoded = decode_command(record.value or b"")
        if isinstance(decoded, Undecodable):
            garbage += 1
            continue
        answerable[source(record.partition, record.offset)] = (
            decoded.account,
            decoded.command_id,
        )
    return answerable, garbage


def _one_result_each(
    answers: _Answers, answerable: dict[bytes, tuple[str, str]], garbage: int
) -> Check:
    by_source = answers.by_source
    missing = [src for src in answerable if by_source[src] == 0]
    doubled = [src for src in answerable if by_source[src] > 1]
    orphans = [src for src in by_source if src not in answerable]
    return Check(
        "exactly one result per command record",
        not missing and not doubled and not orphans,
        f"{len(answerable)} records (+{garbage} garbage): {len(missing)} without a result,"
        f" {len(doubled)} with several, {len(orphans)} results for no record"
        + (f"; e.g. {(missing + doubled + orphans)[:3]}" if missing or doubled or orphans else ""),
    )


def _one_decision(answers: _Answers, client_ids: set[tuple[str, str]]) -> Check:
    by_key = answers.by_key
    decisions = {i: sum(_is_decision(r) for r in by_key.get(i, [])) for i in client_ids}
    not_one = {i: n for i, n in decisions.items() if n != 1}
    duplicates = sum(1 for i in client_ids for r in by_key.get(i, []) if not _is_decision(r))
    return Check(
        "one decision per (account, command id)",
        not not_one,
        f"{len(client_ids)} ids, {duplicates} repeats answered duplicate/reused"
        + (
            f"; {len(not_one)} ids with another count, e.g. {list(not_one.items())[:3]}"
            if not_one
            else ""
        ),
    )


def _one_result_per_internal(answers: _Answers, internal: list[Any]) -> Check:
    by_id = answers.by_id
    internal_ids: Counter[str] = Counter()
    for record in internal:
        decoded = decode_command(record.value or b"", internal=True)
        if not isinstance(decoded, Undecodable):
            internal_ids[decoded.command_id] += 1
    repeated_records = [i for i, n in internal_ids.items() if n > 1]
    wrong = [i for i in internal_ids if len(by_id.get(i, [])) != 1]
    implied = {i for rs in by_id.values() for r in rs if _is_decision(r) for i in implied_ids(r)}
    absent = sorted(implied - set(internal_ids))
    expiries = [i for i in by_id if i.startswith("expire.")]
    expiry_wrong = [i for i in expiries if len(by_id[i]) != 1]
    return Check(
        "one result per internal command (credits, refunds, expiries)",
        not repeated_records and not wrong and not absent and not expiry_wrong,
        f"{len(internal_ids)} credits/refunds, {len(expiries)} expiries:"
        f" {len(repeated_records)} written twice, {len(wrong)} without exactly one result,"
        f" {len(absent)} implied but never written, {len(expiry_wrong)} expiries answered"
        " other than once",
    )


def _check_seq(results: list[tuple[Any, Result]]) -> Check:
    seqs: dict[tuple[str, str], list[int]] = defaultdict(list)
    for _, result in results:
        for e in result.entries:
            seqs[(e.account, e.asset)].append(e.seq)
    bad = {k: v for k, v in seqs.items() if sorted(v) != list(range(1, len(v) + 1))}
    entries = sum(len(v) for v in seqs.values())
    return Check(
        "every balance's seq is 1..n, each once",
        not bad,
        f"{len(seqs)} balances, {entries} entries"
        + (f"; {len(bad)} balances with a gap or a repeat, e.g. {next(iter(bad))}" if bad else ""),
    )


def _check_conservation(results: list[tuple[Any, Result]]) -> Check:
    """Per asset (topics.money): money moved inside the engine (transfers, disbursements,
    holds, captures to an account, and their credits and refunds) nets to zero, and the
    sum of the final balances equals deposits - withdrawals - captures paid out."""
    final: dict[tuple[str, str], tuple[int, int, int]] = {}  # balance -> (seq, available, held)
    for _, result in results:
        for e in result.entries:
            key = (e.account, e.asset)
            if e.seq > final.get(key, (0, 0, 0))[0]:
                final[key] = (e.seq, e.available, e.held)
    held = holdings((asset, a, h) for (_, asset), (_, a, h) in final.items())
    assets = conservation(held, flows_of(result for _, result in results))
    return Check(
        "conservation per asset",
        all(f.ok for f in assets),
        "; ".join(
            f"{f.asset}: balances {f.balances} = in-out {f.external}, internal net {f.internal}"
            for f in assets
        ),
    )


def _check_dead_letters(commands: list[Any], letters: list[DeadLetter]) -> Check:
    garbage = Counter(
        (r.topic, r.partition, r.offset)
        for r in commands
        if isinstance(decode_command(r.value or b""), Undecodable)
    )
    found = Counter((d.source_topic, d.source_partition, d.source_offset) for d in letters)
    return Check(
        "dead letters are exactly the garbage sent",
        found == garbage,
        f"{sum(garbage.values())} garbage records, {sum(found.values())} dead letters"
        + (
            ""
            if found == garbage
            else f"; differ at {sorted(set(found.items()) ^ set(garbage.items()))[:3]}"
        ),
    )
