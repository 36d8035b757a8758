"""Tests for the event catalogue and sample payloads."""

from __future__ import annotations

import json

import pytest

from outbox.events import EVENTS, UnknownEvent, check_event, sample

ORDER = [
    "lead.created",
    "lead.scored",
    "reply.received",
    "message.sent",
    "ai_response.sent",
    "meeting.booked",
    "enrichment.completed",
]
MESSAGE_EVENTS = ["reply.received", "message.sent", "ai_response.sent"]


def test_catalogue_order() -> None:
    """The catalogue lists the seven events in the documented order."""
    assert list(EVENTS) == ORDER


@pytest.mark.parametrize("event", ORDER)
def test_sample_is_non_empty_with_lead(event: str) -> None:
    """Every event has a non-empty sample that describes a lead."""
    data = sample(event)
    assert data
    lead = data["lead"]
    assert isinstance(lead, dict)
    assert lead["name"]
    assert "test" not in data


@pytest.mark.parametrize("event", ORDER)
def test_sample_is_json_serialisable(event: str) -> None:
    """Every sample survives a JSON round trip unchanged."""
    data = sample(event)
    assert json.loads(json.dumps(data)) == data


@pytest.mark.parametrize("event", ORDER)
def test_sample_is_a_fresh_copy(event: str) -> None:
    """Mutating one sample, however deep, does not change the next one."""
    first = sample(event)
    lead = first["lead"]
    assert isinstance(lead, dict)
    lead["name"] = "changed"
    first["extra"] = True
    second = sample(event)
    assert "extra" not in second
    assert second["lead"] != lead


def test_samples_share_one_lead() -> None:
    """All samples describe the same lead."""
    assert len({json.dumps(sample(e)["lead"], sort_keys=True) for e in ORDER}) == 1


def test_check_event_accepts_known() -> None:
    """check_event returns a catalogued name unchanged."""
    assert check_event("meeting.booked") == "meeting.booked"


def test_check_event_rejects_unknown() -> None:
    """check_event rejects an unknown name with a message listing all seven events."""
    with pytest.raises(UnknownEvent) as info:
        check_event("foo")
    assert str(info.value) == (
        "unknown event 'foo': valid events are lead.created, lead.scored, "
        "reply.received, message.sent, ai_response.sent, meeting.booked, "
        "enrichment.completed"
    )
    assert isinstance(info.value, ValueError)


def test_sample_rejects_unknown() -> None:
    """sample raises UnknownEvent for a name outside the catalogue."""
    with pytest.raises(UnknownEvent):
        sample("lead.deleted")


def test_lead_scored_has_breakdown() -> None:
    """The lead.scored sample carries overall, fit, intent and timing scores."""
    score = sample("lead.scored")["score"]
    assert isinstance(score, dict)
    for key in ("overall", "fit", "intent", "timing"):
        assert isinstance(score[key], int)


@pytest.mark.parametrize("event", MESSAGE_EVENTS)
def test_message_events_have_content(event: str) -> None:
    """Message and reply samples carry message content and conversation context."""
    data = sample(event)
    message = data["message"]
    assert isinstance(message, dict)
    assert isinstance(message["content"], str)
    assert message["content"]
    assert isinstance(data["conversation"], dict)
