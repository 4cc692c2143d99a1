"""Topic replication: the two settings, their cross-check, and what a start-up decides
from the cluster's broker count and the existing topics' replica counts."""

from __future__ import annotations

import msgspec
import pytest

from core.errors import CANNOT_RUN, exit_status
from core.settings import Settings, SettingsError, load, to_env
from topics.errors import TopicError
from topics.names import deployment_topics, engine_topic_specs, replicas
from topics.replication import (
    ReplicationError,
    check_creatable,
    replica_counts,
    single_copy_warning,
    under_replicated,
)
from topics.specs import Replicas, TopicSpec, changelog_spec, topics_for

THREE = Replicas(factor=3, min_insync=2)


def _spec(name: str, replicas: Replicas = THREE) -> TopicSpec:
    return TopicSpec(
        name=name, partitions=2, cleanup_policy="delete", retention_ms=-1, replicas=replicas
    )


# Settings ------------------------------------------------------------------------------


def test_the_defaults_fit_one_broker() -> None:
    got = load({})
    assert (got.topic_replication, got.topic_min_insync_replicas) == (1, 1)
    assert replicas(got) == Replicas(factor=1, min_insync=1)


def test_three_brokers_settings_are_read() -> None:
    got = load({"TALLY_TOPIC_REPLICATION": "3", "TALLY_TOPIC_MIN_INSYNC_REPLICAS": " 2 "})
    assert replicas(got) == THREE
    assert load(to_env(got)) == got


@pytest.mark.parametrize(("replication", "min_insync"), [("1", "2"), ("2", "3"), ("3", "4")])
def test_min_insync_above_replication_is_refused_naming_both(
    replication: str, min_insync: str
) -> None:
    with pytest.raises(SettingsError) as raised:
        load(
            {
                "TALLY_TOPIC_REPLICATION": replication,
                "TALLY_TOPIC_MIN_INSYNC_REPLICAS": min_insync,
            }
        )
    text = str(raised.value)
    assert f"TALLY_TOPIC_MIN_INSYNC_REPLICAS={min_insync}" in text
    assert f"TALLY_TOPIC_REPLICATION={replication}" in text


def test_min_insync_equal_to_replication_is_allowed() -> None:
    assert load({"TALLY_TOPIC_REPLICATION": "3", "TALLY_TOPIC_MIN_INSYNC_REPLICAS": "3"})


def test_the_cross_check_holds_for_settings_made_in_code_too() -> None:
    with pytest.raises(SettingsError):
        Settings(topic_min_insync_replicas=2)
    with pytest.raises(SettingsError):
        msgspec.structs.replace(Settings(), topic_min_insync_replicas=2)


@pytest.mark.parametrize("name", ["TALLY_TOPIC_REPLICATION", "TALLY_TOPIC_MIN_INSYNC_REPLICAS"])
@pytest.mark.parametrize("value", ["0", "-1", "17", "three"])
def test_bad_counts_name_the_variable(name: str, value: str) -> None:
    with pytest.raises(SettingsError, match=name):
        load({name: value})


# Specs ---------------------------------------------------------------------------------


def test_every_topic_of_a_deployment_carries_the_settings_replication() -> None:
    settings = load({"TALLY_TOPIC_REPLICATION": "3", "TALLY_TOPIC_MIN_INSYNC_REPLICAS": "2"})
    specs = [*deployment_topics(settings).all(), *engine_topic_specs(settings)]
    assert len(specs) == 9  # four deployment topics, and those four and the changelog
    assert {spec.replicas for spec in specs} == {THREE}
    assert {spec.config()["min.insync.replicas"] for spec in specs} == {"2"}


def test_min_insync_is_always_set_on_the_topic_never_left_to_the_broker() -> None:
    # A three-broker cluster's default of 2 would refuse every write to a one-replica
    # topic: the spec says 1 out loud.
    for spec in (*topics_for("t", 2).all(), changelog_spec("t-c", 2)):
        assert spec.replicas == Replicas()
        assert spec.config()["min.insync.replicas"] == "1"


# Decisions -----------------------------------------------------------------------------


def test_creating_more_replicas_than_brokers_is_refused_naming_the_setting() -> None:
    with pytest.raises(ReplicationError) as raised:
        check_creatable([_spec("a.commands"), _spec("a.events")], brokers=1)
    text = str(raised.value)
    assert "TALLY_TOPIC_REPLICATION=3" in text
    assert "1 broker up" in text
    assert "a.commands, a.events" in text
    # A topics-family error: the command ends with one line and status 2.
    assert isinstance(raised.value, TopicError)
    assert exit_status(raised.value) == CANNOT_RUN


def test_creating_as_many_replicas_as_brokers_is_fine() -> None:
    check_creatable([_spec("a.commands")], brokers=3)
    check_creatable([_spec("a.commands", Replicas())], brokers=1)


def test_nothing_to_create_is_never_refused() -> None:
    # Existing three-replica topics with one of three brokers down: the start goes on.
    check_creatable([], brokers=2)


@pytest.mark.parametrize("brokers", [2, 3, 5])
def test_one_replica_on_several_brokers_warns_once_naming_the_setting(brokers: int) -> None:
    specs = [_spec(f"a.{n}", Replicas()) for n in ("commands", "events", "internal")]
    warning = single_copy_warning(specs, brokers)
    assert warning is not None
    assert f"{brokers} brokers" in warning
    assert "TALLY_TOPIC_REPLICATION is 1" in warning
    assert "one broker" in warning


def test_no_warning_on_one_broker_or_with_replication() -> None:
    assert single_copy_warning([_spec("a", Replicas())], brokers=1) is None
    assert single_copy_warning([_spec("a")], brokers=3) is None
    assert single_copy_warning([], brokers=3) is None


def test_an_existing_topic_with_fewer_replicas_is_named() -> None:
    specs = [_spec("a.commands"), _spec("a.events"), _spec("a.internal")]
    lines = under_replicated(specs, {"a.commands": 1, "a.events": 3, "a.internal": 2})
    assert len(lines) == 2
    assert lines[0].startswith("topic a.commands has 1 replica but TALLY_TOPIC_REPLICATION is 3")
    assert lines[1].startswith("topic a.internal has 2 replicas but")
    assert all("reassign" in line for line in lines)


def test_more_replicas_than_asked_or_an_unknown_topic_is_not_warned_about() -> None:
    specs = [_spec("a", Replicas()), _spec("b")]
    assert under_replicated(specs, {"a": 3}) == []


def test_replica_counts_take_the_least_replicated_partition() -> None:
    described = [
        {"topic": "a", "partitions": [{"replicas": [1, 2, 3]}, {"replicas": [2]}]},
        {"topic": "b", "partitions": [{"replicas": [1, 2]}]},
        {"topic": "gone", "partitions": []},
    ]
    assert replica_counts(described) == {"a": 1, "b": 2}
