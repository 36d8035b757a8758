"""Tests for outbox.formats: Slack and Discord messages for every event and any data."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from outbox import formats, wire
from outbox.events import EVENTS, sample
from tests.chat import discord_error, escape_error, slack_error, units

STAMP = "2026-11-27T12:34:56.789Z"
CHATS = ("slack", "discord")
ERRORS = {"slack": slack_error, "discord": discord_error}


def render(fmt: str, event: str, data: Any) -> dict[str, Any]:
    raw = data if isinstance(data, str) else json.dumps(data)
    body = formats.render(fmt, event, STAMP, raw)
    parsed: dict[str, Any] = json.loads(body.decode("utf-8"))
    return parsed


def check(fmt: str, event: str, message: dict[str, Any]) -> None:
    """The service would post it, and nothing in it mentions, links or formats."""
    assert ERRORS[fmt](message) is None, (event, ERRORS[fmt](message))
    assert escape_error(fmt, message) is None, (event, escape_error(fmt, message))


def strings(message: Any) -> str:
    """Every string of a message, joined: what a reader could see."""
    if isinstance(message, str):
        return message
    if isinstance(message, dict):
        return "\n".join(strings(v) for v in message.values())
    if isinstance(message, list):
        return "\n".join(strings(v) for v in message)
    return ""


class TestSamples:
    """The samples of test sends become messages that say who, what and when."""

    @pytest.mark.parametrize("fmt", CHATS)
    @pytest.mark.parametrize("event", list(EVENTS))
    def test_every_sample_is_accepted(self, fmt: str, event: str) -> None:
        """Each event's sample renders to a message the service would post."""
        check(fmt, event, render(fmt, event, sample(event)))

    @pytest.mark.parametrize("event", list(EVENTS))
    def test_names_the_lead_and_the_event(self, event: str) -> None:
        """The header or title names the event and the lead; the summary names the lead."""
        slack = render("slack", event, sample(event))
        assert slack["blocks"][0]["text"]["text"] == f"{EVENTS[event]}: Maren Okafor"
        assert "Maren Okafor" in slack["text"]
        discord = render("discord", event, sample(event))
        assert discord["embeds"][0]["title"] == f"{EVENTS[event]}: Maren Okafor"
        assert "Maren Okafor" in discord["content"]

    def test_score_with_its_parts(self) -> None:
        """Lead Scored says the score with fit, intent and timing."""
        text = render("slack", "lead.scored", sample("lead.scored"))["text"]
        assert text == "Maren Okafor scored 87 (fit 91, intent 84, timing 82)"

    def test_reply_quotes_the_message(self) -> None:
        """Reply Received quotes the reply, in the summary and in the card."""
        message = render("slack", "reply.received", sample("reply.received"))
        assert message["text"].startswith("Maren Okafor replied: “Timing is good")
        assert "\n> Timing is good" in message["blocks"][1]["text"]["text"]

    def test_meeting_time_in_iso_and_in_words(self) -> None:
        """Meeting Booked gives the start in ISO 8601 and in a form people read."""
        text = render("discord", "meeting.booked", sample("meeting.booked"))["content"]
        assert "Fri 7 Mar 2025, 14\\:00 UTC+01\\:00" not in text  # ":" is not escaped
        assert "Fri 7 Mar 2025, 14:00 UTC+01:00" in text
        assert "2025-03-07T14:00:00+01:00" in text

    def test_enrichment_headline(self) -> None:
        """Enrichment Completed gives the headline."""
        text = render("slack", "enrichment.completed", sample("enrichment.completed"))["text"]
        assert text.endswith(": VP Revenue Operations at Northwind Analytics")

    def test_discord_colour_per_event_and_no_mentions(self) -> None:
        """Each event has its own embed colour; allowed_mentions lets nothing ping."""
        colours = set()
        for event in EVENTS:
            message = render("discord", event, sample(event))
            assert message["allowed_mentions"] == {"parse": []}
            colours.add(message["embeds"][0]["color"])
        assert len(colours) == len(EVENTS)


class TestFallbacks:
    """Missing or wrong-typed data falls back to what is there."""

    @pytest.mark.parametrize("fmt", CHATS)
    @pytest.mark.parametrize("event", list(EVENTS))
    def test_empty_data_says_the_event(self, fmt: str, event: str) -> None:
        """With data {} the message is the event's display name."""
        message = render(fmt, event, {})
        check(fmt, event, message)
        assert (message["text"] if fmt == "slack" else message["content"]) == EVENTS[event]

    def test_lead_as_a_string_and_score_as_a_number(self) -> None:
        """A string where the lead object was expected is its name; a bare score is the
        overall score."""
        text = render("slack", "lead.scored", {"lead": "Ada", "score": 91})["text"]
        assert text == "Ada scored 91"

    def test_numbers_as_strings_and_nulls(self) -> None:
        """Numbers written as strings show as written; null parts are left out."""
        data = {"lead": {"name": None, "username": "ada"}, "score": {"overall": "87", "fit": None}}
        assert render("slack", "lead.scored", data)["text"] == "@ada scored 87"

    def test_message_as_a_string(self) -> None:
        """A bare string for message is its content."""
        text = render("slack", "reply.received", {"message": "Sure, call me"})["text"]
        assert text == "A lead replied: “Sure, call me”"

    def test_meeting_time_that_does_not_parse(self) -> None:
        """A start that is not ISO 8601 is shown as given."""
        data = {"lead": {"name": "Ada"}, "meeting": {"start": "next Tuesday"}}
        assert render("slack", "meeting.booked", data)["text"] == (
            "Meeting booked with Ada: next Tuesday"
        )

    def test_big_numbers_keep_every_digit(self) -> None:
        """Numbers are shown as the producer wrote them, however long."""
        raw = '{"lead": {"name": "Ada"}, "score": {"overall": ' + "9" * 5000 + "}}"
        message = render("discord", "lead.scored", raw)
        check("discord", "lead.scored", message)
        assert message["content"].startswith("Ada scored 999")

    def test_nesting_too_deep_for_the_parser(self) -> None:
        """Nesting Python cannot parse (jsonb can hold it) is left out; the rest shows."""
        deep = "[" * 5000 + "]" * 5000
        raw = '{"junk": ' + deep + ', "lead": {"name": "Ada", "x": "[{"}}'
        assert formats.parse_data(raw)["lead"]["name"] == "Ada"
        check("slack", "lead.created", render("slack", "lead.created", raw))

    @pytest.mark.parametrize("raw", ["[]", "null", "42", "not json", ""])
    def test_data_that_is_not_an_object(self, raw: str) -> None:
        """Anything but an object reads as empty data."""
        assert formats.parse_data(raw) == {}


class TestEscaping:
    """Data shows as text: it mentions nobody and links nowhere."""

    HOSTILE = "<!channel> <@U123> <https://evil.example|click> @everyone @here [x](https://e) **b**"

    def test_slack_escapes_angle_brackets_and_ampersands(self) -> None:
        """Slack gets &lt; &gt; &amp; for data's < > &."""
        data = {"lead": {"name": "A & B <!channel>"}, "message": {"content": self.HOSTILE}}
        message = render("slack", "reply.received", data)
        check("slack", "reply.received", message)
        assert message["blocks"][0]["text"]["text"] == "Reply Received: A &amp; B &lt;!channel&gt;"
        assert "&lt;https://evil.example|click&gt;" in message["text"]

    def test_discord_escapes_markdown_and_mentions(self) -> None:
        """Discord gets backslash escapes, and @everyone with a zero-width space."""
        data = {"lead": {"name": "# Ada"}, "message": {"content": self.HOSTILE}}
        message = render("discord", "reply.received", data)
        check("discord", "reply.received", message)
        assert message["content"].startswith("\\# Ada replied")
        assert "\\<@U123>" in message["content"]
        assert "@\u200beveryone" in message["content"]
        assert "\\[x\\](https" in message["content"]

    @pytest.mark.parametrize("fmt", CHATS)
    def test_cut_never_splits_an_escape(self, fmt: str) -> None:
        """A header of 200 "&" (or "*") is cut between escapes, ellipsis included."""
        char = "&" if fmt == "slack" else "*"
        message = render(fmt, "lead.created", {"lead": {"name": char * 200}})
        check(fmt, "lead.created", message)
        title = message["blocks"][0]["text"]["text"] if fmt == "slack" else None
        if fmt == "discord":
            title = message["embeds"][0]["title"]
        assert title is not None and title.endswith(ELLIPSIS_AFTER[fmt])


ELLIPSIS_AFTER = {"slack": "&amp;…", "discord": "\\*…"}


class TestLimits:
    """Limits are kept whatever the size of data."""

    @pytest.mark.parametrize("fmt", CHATS)
    @pytest.mark.parametrize("event", list(EVENTS))
    def test_huge_strings_everywhere(self, fmt: str, event: str) -> None:
        """Every field of the sample 60,000 characters long still fits every limit."""
        data = sample(event)

        def blow_up(value: Any) -> Any:
            if isinstance(value, dict):
                return {k: blow_up(v) for k, v in value.items()}
            if isinstance(value, list):
                return [blow_up(v) for v in value]
            if isinstance(value, str):
                return ("<&😀 " + value + " ") * (60_000 // (len(value) + 6) + 1)
            return value

        message = render(fmt, event, blow_up(data))
        check(fmt, event, message)
        summary = message["text"] if fmt == "slack" else message["content"]
        assert summary.endswith("…")
        assert units(summary) <= (3000 if fmt == "slack" else 2000)

    def test_emoji_count_as_two(self) -> None:
        """Characters outside the BMP count two units, as Slack and Discord count them."""
        message = render("discord", "lead.created", {"lead": {"name": "😀" * 300}})
        title = message["embeds"][0]["title"]
        assert units(title) <= 256 < len(title) * 2 + 2

    def test_units_counts_as_utf16_does(self) -> None:
        """The count is the UTF-16 length, also for a lone surrogate (one unit)."""
        for text in ("", "plain", "é", "😀", "a😀b😀", "\ud800", "x\udfffy😀"):
            expected = len(text.encode("utf-16-le", "surrogatepass")) // 2
            assert formats.units(text) == expected == units(text), text

    @pytest.mark.parametrize("fmt", CHATS)
    def test_a_string_at_the_size_limit_shows_its_start(self, fmt: str) -> None:
        """Only the start of a 256 KiB string is read (nothing shown is that long), so
        its message shows that start, cut with an ellipsis, and cleaned as ever."""
        name = "Ada\x01 Lovelace " + "x" * 250_000 + " @everyone"
        message = render(fmt, "lead.scored", {"lead": {"name": name}, "score": {"overall": 9}})
        check(fmt, "lead.scored", message)
        summary = message["text"] if fmt == "slack" else message["content"]
        assert summary.startswith("Ada Lovelace xxx")
        assert summary.endswith("…")
        assert "@everyone" not in strings(message)


# --- generated data --------------------------------------------------------------------

FRAGMENTS = [
    "<!channel>",
    "<!here|here>",
    "<@U123ABC>",
    "<#C1|general>",
    "<https://evil.example|click here>",
    "[click](https://evil.example)",
    "@everyone",
    "@HERE",
    "@channel",
    "&",
    "&amp;",
    "&lt;",
    ">",
    "> quoted",
    "# heading",
    "-# subtext",
    "- item",
    "1. first",
    "**bold**",
    "__u__",
    "~~s~~",
    "`code`",
    "```block```",
    "||spoiler||",
    "\\",
    "\\<",
    "😀",
    "👩‍👩‍👧‍👦",
    "🇳🇱",
    "e\u0301\u0301\u0301",
    "שלום עולם",
    "مرحبا",
    "\u202eevil\u202c",
    "\u200b",
    "\ufeff",
    "\udc00",
    "\n",
    "\r\n",
    "\t",
    "\x01\x7f",
    "  ",
    "Ada Lovelace",
    "2025-03-07T14:00:00+01:00",
    "87",
    "-1.5e3",
    "",
]
KEYS = {
    "lead": ["name", "username", "headline", "location", "email", "bio", "id"],
    "score": ["overall", "fit", "intent", "timing", "buyer_state", "strategy"],
    "source": ["discovered_via", "platform", "keyword", "post_url", "post_content"],
    "message": ["content", "text", "body", "channel", "sent_at", "direction"],
    "conversation": ["channel", "message_count", "messages"],
    "meeting": ["start", "end", "timezone", "title", "calendar_link", "attendee"],
    "enrichment": ["headline", "summary", "skills", "languages", "company"],
    "web_intelligence": ["website", "findings"],
}


def text(rng: random.Random) -> str:
    size = rng.choice([0, 1, 3, 10, 40])
    result = "".join(rng.choice(FRAGMENTS) for _ in range(size))
    if rng.random() < 0.05:
        # Up to 100,000 characters: data can be 256 KiB.
        result = (result or "x") * (rng.randint(1_000, 100_000) // max(1, len(result)))
    return result


def value(rng: random.Random, depth: int = 0) -> Any:
    roll = rng.random()
    if roll < 0.45:
        return text(rng)
    if roll < 0.55:
        return rng.choice([0, -1, 87, 2**70, 3.5, 1e300])
    if roll < 0.6:
        return str(rng.randint(0, 100))
    if roll < 0.65:
        return rng.choice([None, True, False])
    if depth > 4:
        return None
    if roll < 0.8:
        return [value(rng, depth + 1) for _ in range(rng.randint(0, 5))]
    keys = [k for ks in KEYS.values() for k in ks]
    return {rng.choice(keys): value(rng, depth + 1) for _ in range(rng.randint(0, 6))}


def nested(rng: random.Random, depth: int) -> Any:
    inner: Any = text(rng)
    for _ in range(depth):
        inner = [inner] if rng.random() < 0.5 else {"name": inner}
    return inner


def generated(rng: random.Random) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for key, fields in KEYS.items():
        roll = rng.random()
        if roll < 0.2:
            continue
        if roll < 0.35:
            data[key] = value(rng)
        else:
            data[key] = {f: value(rng) for f in fields if rng.random() < 0.7}
    if rng.random() < 0.1:
        data["deep"] = nested(rng, rng.randint(10, 200))
    if rng.random() < 0.1:
        data[text(rng) or "x"] = value(rng)
    return data


class TestGenerated:
    """Generated data objects (a seeded random, so a failure repeats): whatever their
    shape, every message is accepted and nothing in it is unescaped."""

    @pytest.mark.parametrize("seed", range(8))
    def test_any_data(self, seed: int) -> None:
        """40 objects per seed, each rendered for every event in both formats."""
        rng = random.Random(seed)
        for _ in range(40):
            data = generated(rng)
            raw = json.dumps(data)
            for event in EVENTS:
                for fmt in CHATS:
                    # Not render(), whose safety net would hide a reader's exception.
                    msg = formats.message(event, STAMP, formats.parse_data(raw))
                    body = formats.slack(msg) if fmt == "slack" else formats.discord(msg)
                    message = json.loads(json.dumps(body, ensure_ascii=False).encode())
                    assert ERRORS[fmt](message) is None, (seed, event, fmt, ERRORS[fmt](message))
                    error = escape_error(fmt, message)
                    assert error is None, (seed, event, fmt, error)


class TestPayload:
    """outbox.wire.payload picks the body by format."""

    def test_json_is_the_plain_body(self) -> None:
        """json gets exactly wire.body."""
        raw = json.dumps(sample("lead.scored"))
        assert wire.payload("json", "lead.scored", STAMP, raw) == wire.body(
            "lead.scored", STAMP, raw
        )

    @pytest.mark.parametrize("fmt", CHATS)
    def test_chat_formats_render(self, fmt: str) -> None:
        """slack and discord get their message."""
        raw = json.dumps(sample("lead.scored"))
        assert wire.payload(fmt, "lead.scored", STAMP, raw) == formats.render(
            fmt, "lead.scored", STAMP, raw
        )

    def test_unknown_format(self) -> None:
        """Another format is an error that names the chat formats."""
        with pytest.raises(ValueError, match="slack, discord"):
            wire.payload("teams", "lead.scored", STAMP, "{}")
