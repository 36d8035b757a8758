"""Chat messages for Slack and Discord webhooks (pure functions, no I/O).

A webhook's ``format`` chooses the body its receiver gets: the plain JSON body
(outbox.wire.body), a Slack incoming-webhook message, or a Discord webhook message.
Slack and Discord refuse the plain body, so for them each event becomes one short
message that reads well in a channel: who, what, and the event's display name.

``data`` is whatever a producer inserted, up to 256 KiB: any key may be missing, of
another type (a string where an object was expected, numbers as strings, null) or
huge, and any string may try to mention a channel or forge a link. So every value is
read defensively (``_Reader``), every string from data is escaped for the service it
goes to, and every text is cut to the service's limit after escaping, counted the way
the service counts: in UTF-16 code units, which is never fewer than code points, so a
text within the limit passes whichever of the two a service counts.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from outbox.events import EVENTS

__all__ = [
    "DISCORD",
    "FORMATS",
    "SLACK",
    "Message",
    "discord",
    "message",
    "parse_data",
    "render",
    "slack",
    "units",
]

FORMATS = ("json", "slack", "discord")

ELLIPSIS = "…"


@dataclass(frozen=True)
class SlackLimits:
    text: int = 3000
    blocks: int = 50
    header: int = 150
    section_text: int = 3000
    # Slack documents 10 fields of at most 2,000 characters each in a section.
    fields: int = 10
    field_text: int = 2000
    context_elements: int = 10
    context_text: int = 3000


@dataclass(frozen=True)
class DiscordLimits:
    content: int = 2000
    embeds: int = 10
    title: int = 256
    description: int = 4096
    fields: int = 25
    field_name: int = 256
    field_value: int = 1024
    footer: int = 2048
    embed_total: int = 6000


SLACK = SlackLimits()
DISCORD = DiscordLimits()

# A one-line summary quotes only the start of a long message: a notification, not a copy.
SUMMARY_QUOTE = 280
# A fact (a field of the card) is a short value: a score, a place, a time.
FACT_VALUE = 256
# The longer text of a card (a message, a post, a strategy) is cut well before the
# services' limits: nobody reads 4,000 characters in a channel.
QUOTE = 1500
# What a Discord embed keeps for its description, whatever the fields take.
DESCRIPTION_ROOM = 1000
# Lists in data (skills, findings) show their first few items.
LIST_ITEMS = 8
# Deeper JSON than this is left out rather than parsed: nothing shown is that deep,
# and Python's parser gives up near a depth of 1,000, where jsonb does not.
MAX_DEPTH = 32
# Only the start of a string in data is read: nothing shown is longer than a Discord
# description (4,096), and cleaning the rest of a 256 KiB string would cost the event
# loop milliseconds for text nobody sees.
TEXT_READ = 8192

# Discord colours per event (RGB as an integer).
COLOURS = {
    "lead.created": 0x3B82F6,
    "lead.scored": 0xF59E0B,
    "reply.received": 0x22C55E,
    "message.sent": 0x64748B,
    "ai_response.sent": 0x8B5CF6,
    "meeting.booked": 0x14B8A6,
    "enrichment.completed": 0x6366F1,
}

Escape = Callable[[str], str]


def units(text: str) -> int:
    """Length in UTF-16 code units: characters outside the BMP (most emoji) count two.
    Counted by the codec, not per character in Python: texts may be 256 KiB long."""
    if text.isascii():
        return len(text)
    return len(text.encode("utf-16-le", "surrogatepass")) // 2


# --- text: cleaning, escaping, fitting -------------------------------------------------

_SURROGATE = re.compile("[\ud800-\udfff]")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]")
_SPACE = re.compile(r"\s+")
_BLANK_LINES = re.compile(r"\n{3,}")
# Written as text, these ping everyone in Slack (with link_names) and Discord (unless
# allowed_mentions says otherwise); a zero-width space after "@" shows the same word
# and pings nobody, whichever safeguard a receiver honours.
_BROADCAST = re.compile(r"@(?=everyone|here|channel)", re.IGNORECASE)


def _clean(text: str, *, one_line: bool) -> str:
    """Text fit to show: no control characters or lone surrogates, no mass mentions."""
    # Every step is one pass in C (a regex, the codec): data may hold 256 KiB strings,
    # and a Python loop per character over one costs the event loop tens of milliseconds.
    if _SURROGATE.search(text):
        text = text.encode("utf-8", "replace").decode("utf-8")
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\t", " ")
    text = _CONTROL.sub("", text)
    text = _BROADCAST.sub("@\u200b", text)
    if one_line:
        return _SPACE.sub(" ", text).strip()
    text = "\n".join(line.strip() for line in text.split("\n"))
    return _BLANK_LINES.sub("\n\n", text).strip()


def _shorten(text: str, limit: int) -> str:
    """At most ``limit`` characters of raw text, with an ellipsis where it was cut."""
    if len(text) <= limit:
        return text
    return text[: limit - 1].rstrip() + ELLIPSIS


_SLACK_ENTITIES = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;"})


def _slack(text: str) -> str:
    """Slack's three escapes: data can then neither mention (``<!channel>``, ``<@U1>``)
    nor link (``<https://x|y>``), nor start a quote with ``>``."""
    return text.translate(_SLACK_ENTITIES)


def _slack_quote(text: str) -> str:
    return _slack(text).replace("\n", "\n> ")


# Inline markdown (bold, italics, strike, code, spoilers), masked links and mentions
# (``<@1>``, ``<#1>``, ``<t:1>``) are escaped wherever they stand; Discord shows a
# backslash before punctuation as the character alone.
_DISCORD_INLINE = re.compile(r"([\\*_~`|<\[\]])")
# Quotes, headings, lists and subtext only start a line, so only there are they escaped:
# ISO times and hyphenated names stay readable.
_DISCORD_LINE_START = re.compile(r"^([ ]*(?:[>#+-]|\d+(?=\.(?:\s|$))))", re.MULTILINE)


def _discord(text: str) -> str:
    """Discord markdown escaped, so data shows as written and pings nobody (the message
    also says ``allowed_mentions: {"parse": []}``)."""
    text = _DISCORD_INLINE.sub(r"\\\1", text)
    return _DISCORD_LINE_START.sub(_escape_line_start, text)


def _escape_line_start(match: re.Match[str]) -> str:
    """``# x`` as ``\\# x``; ``1. x`` as ``1\\. x`` (a backslash before a digit would show)."""
    start = match.group(1)
    if start[-1].isdigit():
        return start + "\\"
    return start[:-1] + "\\" + start[-1]


def _discord_quote(text: str) -> str:
    return _discord(text).replace("\n", "\n> ")


def _fit(raw: str, limit: int, escape: Escape) -> str:
    """``raw`` escaped, cut so that it is at most ``limit`` UTF-16 code units, ellipsis
    included. The raw text is cut, then escaped, so a cut never splits an escape
    sequence (``&amp;``, ``\\*``) or a surrogate pair."""
    if limit < units(ELLIPSIS):
        return ""
    # Each character escapes to at least one unit: more than ``limit`` can never fit.
    head = raw[: limit + 1]
    escaped = escape(head)
    if len(head) == len(raw) and units(escaped) <= limit:
        return escaped
    budget = limit - units(ELLIPSIS)
    # The longest prefix that fits: escaping a longer prefix never gives a shorter text.
    low, high = 0, len(head)
    while low < high:
        middle = (low + high + 1) // 2
        if units(escape(head[:middle])) <= budget:
            low = middle
        else:
            high = middle - 1
    return escape(head[:low].rstrip()) + ELLIPSIS


# --- reading data ----------------------------------------------------------------------

_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]', re.DOTALL)


def _prune(text: str, depth: int) -> str:
    """The JSON ``text`` with every array or object nested deeper than ``depth`` replaced
    by null: a scan of brackets outside strings, so any nesting parses afterwards."""
    out = []
    level = 0
    skip_from = -1
    last = 0
    for match in _TOKENS.finditer(text):
        piece = match.group()
        if piece in ("[", "{"):
            level += 1
            if level == depth + 1:
                skip_from = match.start()
        elif piece in ("]", "}"):
            if level == depth + 1 and skip_from >= 0:
                out.append(text[last:skip_from])
                out.append("null")
                last = match.end()
                skip_from = -1
            level -= 1
    out.append(text[last:])
    return "".join(out)


def parse_data(data_json: str) -> dict[str, Any]:
    """The producer's ``data`` as a dict; numbers stay the text the producer wrote (no
    float rounding, no limit on digits). Anything that is not an object reads as {}."""
    try:
        data = json.loads(data_json, parse_int=str, parse_float=str)
    except RecursionError:
        data = json.loads(_prune(data_json, MAX_DEPTH), parse_int=str, parse_float=str)
    except ValueError:
        data = None
    return data if isinstance(data, dict) else {}


def _scalar(value: Any) -> str | None:
    """A value to show as text: strings and numbers (also numbers written as strings);
    None for null, booleans, lists and objects, and for blank strings."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        value = str(value)
    if not isinstance(value, str):
        return None
    value = _clean(value[:TEXT_READ], one_line=False)
    return value or None


def _line(value: Any) -> str | None:
    text = _scalar(value)
    return None if text is None else _clean(text, one_line=True) or None


def _get(obj: Any, *path: str) -> Any:
    """``obj[path[0]][path[1]]...``, or None where a step is missing or not an object."""
    for key in path:
        if not isinstance(obj, Mapping):
            return None
        obj = obj.get(key)
    return obj


def _first(*values: Any) -> str | None:
    for value in values:
        text = _line(value)
        if text:
            return text
    return None


def _items(value: Any) -> list[str]:
    """A list's first few items as text: scalars, or objects by a name-like key."""
    if isinstance(value, str):
        text = _line(value)
        return [text] if text else []
    if not isinstance(value, list):
        return []
    result = []
    for item in value:
        if isinstance(item, Mapping):
            text = _first(item.get("name"), item.get("title"), item.get("content"))
        else:
            text = _line(item)
        if text:
            result.append(text)
        if len(result) == LIST_ITEMS:
            break
    return result


def _section(data: Mapping[str, Any], key: str, main: str) -> Mapping[str, Any]:
    """``data[key]`` as an object: a bare value where an object was expected (a string
    for ``lead``, a number for ``score``) is taken as that object's ``main`` field."""
    value = data.get(key)
    if isinstance(value, Mapping):
        return value
    if value is None or isinstance(value, list | bool):
        return {}
    return {main: value}


def _when(value: Any) -> tuple[str, str | None] | None:
    """(ISO 8601, human form) of a time; the human form is None when it does not parse."""
    text = _line(value)
    if text is None:
        return None
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        return text, None
    human = f"{at:%a} {at.day} {at:%b %Y}, {at:%H:%M}"
    if at.utcoffset() is not None:
        offset = at.strftime("%z")
        human += " UTC" if offset == "+0000" else f" UTC{offset[:3]}:{offset[3:]}"
    return at.isoformat(), human


# --- what a message says ---------------------------------------------------------------


@dataclass
class Message:
    """One event as a chat message, in raw (unescaped) text."""

    event: str
    display: str
    timestamp: str
    title: str
    summary: str
    intro: str | None = None
    quote: str | None = None
    facts: list[tuple[str, str]] = field(default_factory=list)


def _fact(facts: list[tuple[str, str]], label: str, value: str | None) -> None:
    if value:
        facts.append((label, value))


def _score_facts(score: Mapping[str, Any]) -> list[tuple[str, str]]:
    facts: list[tuple[str, str]] = []
    for label, key in (("Score", "overall"), ("Fit", "fit"), ("Intent", "intent")):
        _fact(facts, label, _line(score.get(key)))
    _fact(facts, "Timing", _line(score.get("timing")))
    _fact(facts, "Buyer state", _line(score.get("buyer_state")))
    _fact(facts, "Channel", _line(score.get("recommended_channel")))
    return facts


def message(event: str, timestamp: str, data: Mapping[str, Any]) -> Message:
    """What the message about one event says, for any ``data`` whatever its shape."""
    display = EVENTS.get(event, event)
    lead = _section(data, "lead", "name")
    username = _line(lead.get("username"))
    who = _first(
        lead.get("name"),
        f"@{username.lstrip('@')}" if username else None,
        _get(data, "meeting", "attendee", "name"),
        lead.get("email"),
    )
    headline = _line(lead.get("headline"))
    facts: list[tuple[str, str]] = []
    quote: str | None = None
    intro: str | None = None
    summary: str | None = None

    if event == "lead.created":
        source = _section(data, "source", "discovered_via")
        via = _first(source.get("discovered_via"), source.get("platform"))
        quote = _scalar(source.get("post_content"))
        if who or headline:
            summary = "New lead: " + ", ".join(p for p in (who, headline) if p)
            if via:
                summary += f" (via {via.replace('_', ' ')})"
        _fact(facts, "Headline", headline)
        _fact(facts, "Location", _line(lead.get("location")))
        _fact(facts, "Source", via)
        _fact(facts, "Keyword", _line(source.get("keyword")))
        _fact(facts, "Platform", _line(source.get("platform")))
        _fact(facts, "Post", _line(source.get("post_url")))
        intro = "The post that surfaced them:" if quote else None
    elif event == "lead.scored":
        score = _section(data, "score", "overall")
        overall = _line(score.get("overall"))
        parts = [
            f"{name} {value}"
            for name, value in (
                ("fit", _line(score.get("fit"))),
                ("intent", _line(score.get("intent"))),
                ("timing", _line(score.get("timing"))),
            )
            if value
        ]
        if overall:
            summary = f"{who or 'A lead'} scored {overall}"
        elif who:
            summary = f"{who} was scored"
        if summary and parts:
            summary += f" ({', '.join(parts)})"
        facts = _score_facts(score)
        quote = _scalar(score.get("strategy"))
        intro = "Suggested strategy:" if quote else None
    elif event in ("reply.received", "message.sent", "ai_response.sent"):
        msg = _section(data, "message", "content")
        quote = _scalar(msg.get("content")) or _scalar(msg.get("text")) or _scalar(msg.get("body"))
        verb = {
            "reply.received": f"{who or 'A lead'} replied",
            "message.sent": "Message sent" + (f" to {who}" if who else ""),
            "ai_response.sent": "AI response sent" + (f" to {who}" if who else ""),
        }[event]
        summary = verb
        if quote:
            summary += f": “{_shorten(_clean(quote, one_line=True), SUMMARY_QUOTE)}”"
        elif not who:
            summary = None
        _fact(facts, "Channel", _first(msg.get("channel"), _get(data, "conversation", "channel")))
        _fact(facts, "Sent at", _line(msg.get("sent_at")))
        _fact(facts, "Messages in thread", _line(_get(data, "conversation", "message_count")))
        _fact(facts, "Headline", headline)
        intro = {
            "reply.received": f"{who or 'The lead'} wrote:",
            "message.sent": "We wrote" + (f" to {who}" if who else "") + ":",
            "ai_response.sent": "The AI auto-responder wrote" + (f" to {who}" if who else "") + ":",
        }[event]
    elif event == "meeting.booked":
        meeting = _section(data, "meeting", "start")
        when = _when(meeting.get("start"))
        zone = _line(meeting.get("timezone"))
        summary = "Meeting booked" + (f" with {who}" if who else "")
        if when:
            iso, human = when
            summary += f": {human} ({iso})" if human else f": {iso}"
        elif not who:
            summary = None
        if when:
            _fact(facts, "When", when[1] or when[0])
            _fact(facts, "Start (ISO 8601)", when[0])
        end = _when(meeting.get("end"))
        _fact(facts, "End (ISO 8601)", end[0] if end else None)
        _fact(facts, "Time zone", zone)
        _fact(facts, "Title", _line(meeting.get("title")))
        _fact(facts, "Calendar", _line(meeting.get("calendar_link")))
        _fact(facts, "Email", _first(_get(meeting, "attendee", "email"), lead.get("email")))
    elif event == "enrichment.completed":
        enrichment = _section(data, "enrichment", "summary")
        company = _section(enrichment, "company", "name")
        found = _first(enrichment.get("headline"), headline)
        summary = "Enrichment completed" + (f" for {who}" if who else "")
        if found:
            summary += f": {found}"
        elif not who:
            summary = None
        quote = _scalar(enrichment.get("summary"))
        _fact(facts, "Headline", found)
        _fact(facts, "Company", _line(company.get("name")))
        _fact(facts, "Industry", _line(company.get("industry")))
        _fact(facts, "Employees", _line(company.get("employees")))
        _fact(facts, "Skills", ", ".join(_items(enrichment.get("skills"))) or None)
        _fact(facts, "Languages", ", ".join(_items(enrichment.get("languages"))) or None)
        _fact(facts, "Website", _line(_get(data, "web_intelligence", "website", "url")))
    for label, value in (("Location", lead.get("location")), ("Email", lead.get("email"))):
        if all(existing != label for existing, _ in facts):
            _fact(facts, label, _line(value))

    title = display + (f": {who}" if who else "")
    return Message(
        event=event,
        display=display,
        timestamp=timestamp,
        title=title,
        summary=_clean(summary or title, one_line=True),
        intro=intro,
        quote=_shorten(quote, QUOTE) if quote else None,
        facts=[(label, _shorten(value, FACT_VALUE)) for label, value in facts],
    )


# --- Slack -----------------------------------------------------------------------------


def _mrkdwn(text: str) -> dict[str, str]:
    return {"type": "mrkdwn", "text": text}


def slack(msg: Message, limits: SlackLimits = SLACK) -> dict[str, Any]:
    """A Slack incoming-webhook message: ``text`` (the notification) and Block Kit."""
    body_text = _fit(msg.summary, limits.section_text, _slack)
    if msg.quote:
        lead_in = _fit(msg.intro or msg.summary, limits.section_text // 3, _slack)
        room = limits.section_text - units(lead_in) - units("\n> ")
        body_text = f"{lead_in}\n> {_fit(msg.quote, room, _slack_quote)}"
    blocks: list[dict[str, Any]] = [
        {
            "type": "header",
            "text": {
                "type": "plain_text",
                "text": _fit(msg.title, limits.header, _slack),
                "emoji": True,
            },
        },
        {"type": "section", "text": _mrkdwn(body_text)},
    ]
    fields = []
    for label, value in msg.facts[: limits.fields]:
        name = f"*{label}*\n"
        fields.append(_mrkdwn(name + _fit(value, limits.field_text - units(name), _slack)))
    if fields:
        blocks.append({"type": "section", "fields": fields})
    context = f"{msg.display} · {msg.event} · {msg.timestamp}"
    blocks.append(
        {
            "type": "context",
            "elements": [_mrkdwn(_fit(context, limits.context_text, _slack))],
        }
    )
    return {"text": _fit(msg.summary, limits.text, _slack), "blocks": blocks}


# --- Discord ---------------------------------------------------------------------------


def _embed_size(embed: Mapping[str, Any]) -> int:
    """What Discord counts toward an embed's total."""
    size = units(embed.get("title", "")) + units(embed.get("description", ""))
    size += units(embed.get("footer", {}).get("text", ""))
    size += units(embed.get("author", {}).get("name", ""))
    for item in embed.get("fields", []):
        size += units(item["name"]) + units(item["value"])
    return size


def discord(msg: Message, limits: DiscordLimits = DISCORD) -> dict[str, Any]:
    """A Discord webhook message: ``content`` (the notification) and one embed."""
    embed: dict[str, Any] = {
        "title": _fit(msg.title, limits.title, _discord),
        "color": COLOURS.get(msg.event, 0x64748B),
        "footer": {"text": _fit(f"{msg.display} · {msg.event}", limits.footer, _discord)},
    }
    if _valid_time(msg.timestamp):
        embed["timestamp"] = msg.timestamp
    fields: list[dict[str, Any]] = []
    used = _embed_size(embed)
    for label, value in msg.facts[: limits.fields]:
        name = _fit(label, limits.field_name, _discord)
        text = _fit(value, min(limits.field_value, FACT_VALUE * 2), _discord)
        # Fields never take the room the description needs.
        if used + units(name) + units(text) > limits.embed_total - DESCRIPTION_ROOM:
            break
        fields.append({"name": name, "value": text, "inline": True})
        used += units(name) + units(text)
    if fields:
        embed["fields"] = fields
    # The description takes what the rest of the embed leaves of the total.
    room = min(limits.description, limits.embed_total - _embed_size(embed))
    # Without a quote, content says it all: no description repeats it.
    if msg.quote:
        lead_in = _fit(msg.intro or msg.summary, room // 3, _discord)
        quoted = _fit(msg.quote, room - units(lead_in) - units("\n> "), _discord_quote)
        embed["description"] = f"{lead_in}\n> {quoted}"
    return {
        "content": _fit(msg.summary, limits.content, _discord),
        "embeds": [embed],
        "allowed_mentions": {"parse": []},
    }


def _valid_time(text: str) -> bool:
    try:
        datetime.fromisoformat(text)
    except ValueError:
        return False
    return True


# --- the body --------------------------------------------------------------------------

_RENDERERS: dict[str, Callable[[Message], dict[str, Any]]] = {
    "slack": slack,
    "discord": discord,
}


def render(format: str, event: str, timestamp: str, data_json: str) -> bytes:
    """The body of a ``slack`` or ``discord`` webhook's request for one event."""
    try:
        renderer = _RENDERERS[format]
    except KeyError:
        valid = ", ".join(_RENDERERS)
        raise ValueError(f"no chat format {format!r}: chat formats are {valid}") from None
    try:
        body = renderer(message(event, timestamp, parse_data(data_json)))
    except Exception:
        # A delivery must always have a body: data that trips a reader here still
        # gets a message, with the event's display name alone.
        body = renderer(message(event, timestamp, {}))
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
