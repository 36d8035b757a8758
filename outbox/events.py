"""The event catalogue and realistic sample payloads for test sends.

``EVENTS`` maps each wire name to its display name, in catalogue order.
``sample`` returns the ``data`` object of a test send for one event: every
sample describes the same fictional AutoReach lead so they read as one story.
Samples never carry a "test" marker; that flag travels in an HTTP header.
"""

from __future__ import annotations

import copy

from outbox import errors

__all__ = ["EVENTS", "UnknownEvent", "check_event", "sample"]

EVENTS: dict[str, str] = {
    "lead.created": "Lead Created",
    "lead.scored": "Lead Scored",
    "reply.received": "Reply Received",
    "message.sent": "Message Sent",
    "ai_response.sent": "AI Response Sent",
    "meeting.booked": "Meeting Booked",
    "enrichment.completed": "Enrichment Completed",
}


class UnknownEvent(errors.Invalid):
    """Raised when an event name is not in the catalogue."""

    def __init__(self, name: str) -> None:
        self.name = name
        valid = ", ".join(EVENTS)
        super().__init__(f"unknown event {name!r}: valid events are {valid}")


def check_event(name: str) -> str:
    """Return ``name`` if it is a catalogued event, else raise UnknownEvent."""
    if name not in EVENTS:
        raise UnknownEvent(name)
    return name


def _lead() -> dict[str, object]:
    """The one fictional lead every sample is about."""
    return {
        "id": "lead_01J9ZQ4K7M2V8XW3T5N6R0B1CD",
        "name": "Maren Okafor",
        "username": "marenokafor",
        "headline": "VP Revenue Operations at Northwind Analytics",
        "bio": "Building repeatable pipeline for B2B data teams. Ex-Salesforce admin.",
        "location": "Rotterdam, Netherlands",
        "email": "maren@northwind.example.com",
        "links": {
            "x": "https://x.example.com/marenokafor",
            "linkedin": "https://linkedin.example.com/in/maren-okafor",
        },
        "created_at": "2025-03-04T09:12:45Z",
    }


def _message(
    msg_id: str, direction: str, content: str, at: str, *, ai: bool = False
) -> dict[str, object]:
    """One message in the lead's LinkedIn thread."""
    return {
        "id": msg_id,
        "direction": direction,
        "channel": "linkedin",
        "content": content,
        "ai_generated": ai,
        "sent_at": at,
    }


_FIRST = _message(
    "msg_01J9ZR1A",
    "outbound",
    "Hi Maren, saw your post on pipeline hygiene. We help RevOps teams spot "
    "in-market buyers from public signals. Worth a quick chat?",
    "2025-03-04T10:02:00Z",
)
_REPLY = _message(
    "msg_01J9ZS7F",
    "inbound",
    "Timing is good, we are reviewing tooling this quarter. What does pricing look like?",
    "2025-03-05T08:41:17Z",
)
_AI_ANSWER = _message(
    "msg_01J9ZS9K",
    "outbound",
    "Plans start at 49 EUR per seat per month. Happy to walk you through it: "
    "https://cal.example.com/autoreach/demo",
    "2025-03-05T08:43:02Z",
    ai=True,
)


def _conversation(*messages: dict[str, object]) -> dict[str, object]:
    """The thread as it stood when the event fired."""
    return {
        "id": "conv_01J9ZR0X",
        "channel": "linkedin",
        "status": "open",
        "message_count": len(messages),
        "messages": list(messages),
    }


_SAMPLES: dict[str, dict[str, object]] = {
    "lead.created": {
        "source": {
            "discovered_via": "keyword_monitor",
            "keyword": "pipeline hygiene",
            "platform": "x",
            "post_url": "https://x.example.com/marenokafor/status/1897000000000000001",
            "post_content": "Our CRM has 40k contacts and nobody trusts the pipeline. "
            "Looking at tooling to fix this before Q2.",
            "posted_at": "2025-03-04T08:55:10Z",
        },
    },
    "lead.scored": {
        "score": {
            "overall": 87,
            "fit": 91,
            "intent": 84,
            "timing": 82,
            "buyer_state": "actively_evaluating",
            "strategy": "Lead with the pipeline-trust pain from her post; offer a short demo.",
            "recommended_channel": "linkedin",
        },
    },
    "reply.received": {"message": _REPLY, "conversation": _conversation(_FIRST, _REPLY)},
    "message.sent": {"message": _FIRST, "conversation": _conversation(_FIRST)},
    "ai_response.sent": {
        "message": _AI_ANSWER,
        "conversation": _conversation(_FIRST, _REPLY, _AI_ANSWER),
    },
    "meeting.booked": {
        "meeting": {
            "id": "mtg_01J9ZT3P",
            "title": "AutoReach demo with Maren Okafor",
            "start": "2025-03-07T14:00:00+01:00",
            "end": "2025-03-07T14:30:00+01:00",
            "timezone": "Europe/Amsterdam",
            "calendar_link": "https://cal.example.com/autoreach/demo/mtg_01J9ZT3P",
            "attendee": {"name": "Maren Okafor", "email": "maren@northwind.example.com"},
        },
    },
    "enrichment.completed": {
        "enrichment": {
            "summary": "RevOps leader with nine years in B2B SaaS, focused on CRM data quality.",
            "experience": [
                {
                    "title": "VP Revenue Operations",
                    "company": "Northwind Analytics",
                    "start": "2022-01",
                    "end": None,
                },
                {
                    "title": "Salesforce Administrator",
                    "company": "Contoso Cloud",
                    "start": "2016-05",
                    "end": "2021-12",
                },
            ],
            "education": [
                {"school": "Erasmus University Rotterdam", "degree": "MSc Business Analytics"}
            ],
            "skills": ["Salesforce", "HubSpot", "Forecasting", "SQL"],
            "certifications": ["Salesforce Certified Administrator"],
            "languages": ["English", "Dutch"],
            "company": {
                "name": "Northwind Analytics",
                "domain": "northwind.example.com",
                "industry": "Data analytics software",
                "employees": 180,
                "hq": "Rotterdam, Netherlands",
            },
            "recent_posts": [
                {
                    "url": "https://x.example.com/marenokafor/status/1897000000000000001",
                    "content": "Our CRM has 40k contacts and nobody trusts the pipeline.",
                    "posted_at": "2025-03-04T08:55:10Z",
                }
            ],
        },
        "web_intelligence": {
            "website": {
                "url": "https://northwind.example.com",
                "title": "Northwind Analytics: trusted data for revenue teams",
                "description": "Dashboards and data quality tooling for B2B go-to-market teams.",
            },
            "findings": [
                "Hiring two RevOps analysts (careers page, March 2025).",
                "Announced a Series B round in January 2025.",
            ],
        },
    },
}


def sample(event: str) -> dict[str, object]:
    """Return a fresh sample ``data`` object for ``event``; raise UnknownEvent if unknown."""
    data: dict[str, object] = {"lead": _lead()}
    data.update(_SAMPLES[check_event(event)])
    return copy.deepcopy(data)
