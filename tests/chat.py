"""What Slack and Discord accept: the checks their webhook endpoints make, written down
for tests (the unit tests of outbox.formats, and the test receiver's chat modes).

Each check returns None for a message the service would post, else the error it would
answer with. Lengths are counted in UTF-16 code units, the stricter of the two ways
these services are known to count.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

__all__ = ["discord_error", "escape_error", "slack_error", "units"]


def units(text: str) -> int:
    return len(text) + sum(1 for c in text if ord(c) > 0xFFFF)


def _text(value: Any, limit: int) -> bool:
    return isinstance(value, str) and 1 <= units(value) <= limit


def _text_object(obj: Any, limit: int, *, plain_only: bool = False) -> str | None:
    if not isinstance(obj, dict):
        return "a text object must be an object"
    kind = obj.get("type")
    if kind not in (("plain_text",) if plain_only else ("plain_text", "mrkdwn")):
        return f"text object type {kind!r}"
    allowed = {"type", "text", "emoji"} if kind == "plain_text" else {"type", "text", "verbatim"}
    if set(obj) - allowed:
        return f"unknown keys {sorted(set(obj) - allowed)} in a {kind} object"
    if not _text(obj.get("text"), limit):
        return f"{kind} text must be 1 to {limit} characters"
    return None


def _block_error(block: Any) -> str | None:
    if not isinstance(block, dict):
        return "a block must be an object"
    kind = block.get("type")
    if kind == "header":
        if set(block) - {"type", "text", "block_id"}:
            return "unknown keys in header"
        return _text_object(block.get("text"), 150, plain_only=True)
    if kind == "section":
        if set(block) - {"type", "text", "fields", "block_id", "accessory"}:
            return "unknown keys in section"
        if "text" not in block and "fields" not in block:
            return "a section needs text or fields"
        if "text" in block and (error := _text_object(block["text"], 3000)):
            return error
        if "fields" in block:
            fields = block["fields"]
            if not isinstance(fields, list) or not 1 <= len(fields) <= 10:
                return "a section has 1 to 10 fields"
            for item in fields:
                if error := _text_object(item, 2000):
                    return f"field: {error}"
        return None
    if kind == "context":
        if set(block) - {"type", "elements", "block_id"}:
            return "unknown keys in context"
        elements = block.get("elements")
        if not isinstance(elements, list) or not 1 <= len(elements) <= 10:
            return "a context has 1 to 10 elements"
        for item in elements:
            if error := _text_object(item, 3000):
                return f"context: {error}"
        return None
    if kind == "divider":
        return None if set(block) <= {"type", "block_id"} else "unknown keys in divider"
    return f"unsupported block type {kind!r}"


def slack_error(message: Any) -> str | None:
    """Slack's answer to an incoming-webhook message it refuses, e.g. ``no_text``."""
    if not isinstance(message, dict):
        return "invalid_payload"
    text = message.get("text")
    if not isinstance(text, str) or not text.strip():
        return "no_text"
    if units(text) > 3000:
        return "invalid_text: over 3000 characters"
    if "blocks" in message:
        blocks = message["blocks"]
        if not isinstance(blocks, list) or not 1 <= len(blocks) <= 50:
            return "invalid_blocks: 1 to 50 blocks"
        for number, block in enumerate(blocks):
            if error := _block_error(block):
                return f"invalid_blocks: block {number}: {error}"
    return None


_EMBED_KEYS = {"title", "description", "url", "timestamp", "color", "footer", "fields", "author"}


def _embed_error(embed: Any) -> str | None:
    if not isinstance(embed, dict):
        return "an embed must be an object"
    if set(embed) - _EMBED_KEYS:
        return f"unknown embed keys {sorted(set(embed) - _EMBED_KEYS)}"
    total = 0
    for key, limit in (("title", 256), ("description", 4096)):
        if key in embed:
            if not _text(embed[key], limit):
                return f"{key} must be 1 to {limit} characters"
            total += units(embed[key])
    if "color" in embed and not (
        isinstance(embed["color"], int) and 0 <= embed["color"] <= 0xFFFFFF
    ):
        return "color must be an integer from 0 to 0xFFFFFF"
    if "timestamp" in embed:
        try:
            datetime.fromisoformat(embed["timestamp"])
        except (TypeError, ValueError):
            return "timestamp must be ISO 8601"
    if "footer" in embed:
        footer = embed["footer"]
        if not isinstance(footer, dict) or not _text(footer.get("text"), 2048):
            return "footer text must be 1 to 2048 characters"
        total += units(footer["text"])
    fields = embed.get("fields", [])
    if not isinstance(fields, list) or len(fields) > 25:
        return "at most 25 fields"
    for item in fields:
        if not isinstance(item, dict) or set(item) - {"name", "value", "inline"}:
            return "a field has name, value and inline"
        if not _text(item.get("name"), 256):
            return "field name must be 1 to 256 characters"
        if not _text(item.get("value"), 1024):
            return "field value must be 1 to 1024 characters"
        total += units(item["name"]) + units(item["value"])
    if total > 6000:
        return f"embed has {total} characters; the limit is 6000"
    if not any(key in embed for key in ("title", "description", "fields")):
        return "an embed needs a title, a description or fields"
    return None


def discord_error(message: Any) -> str | None:
    """Discord's answer to a webhook message it refuses, e.g. an empty message."""
    if not isinstance(message, dict):
        return "invalid form body"
    content = message.get("content", "")
    embeds = message.get("embeds", [])
    if not isinstance(content, str) or units(content) > 2000:
        return "content must be at most 2000 characters"
    if not isinstance(embeds, list) or len(embeds) > 10:
        return "at most 10 embeds"
    if not content.strip() and not embeds:
        return "Cannot send an empty message"
    for number, embed in enumerate(embeds):
        if error := _embed_error(embed):
            return f"embeds.{number}: {error}"
    mentions = message.get("allowed_mentions")
    if mentions is not None and (
        not isinstance(mentions, dict)
        or not set(mentions.get("parse", [])) <= {"roles", "users", "everyone"}
    ):
        return "allowed_mentions.parse takes roles, users, everyone"
    return None


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for item in value.values() for s in _strings(item)]
    if isinstance(value, list):
        return [s for item in value for s in _strings(item)]
    return []


_SLACK_BARE_AMPERSAND = re.compile(r"&(?!amp;|lt;|gt;)")
_DISCORD_ESCAPABLE = set("\\*_~`|<[]>#+-.")
_BROADCAST = re.compile(r"@(everyone|here|channel)", re.IGNORECASE)


def _discord_text_error(text: str) -> str | None:
    i = 0
    while i < len(text):
        if text[i] == "\\":
            if i + 1 >= len(text) or text[i + 1] not in _DISCORD_ESCAPABLE:
                return "a stray backslash"
            i += 2
            continue
        if text[i] in "<[*_~`|":
            return f"an unescaped {text[i]}"
        i += 1
    for line in text.split("\n"):
        # "> " is the renderer's own quote marker; data's quotes, headings and lists are
        # escaped at the start of a line.
        line = line.removeprefix("> ").lstrip(" ")
        if _DISCORD_LINE_START.match(line):
            return f"markdown at the start of a line: {line[:40]!r}"
    return None


_DISCORD_LINE_START = re.compile(r"[>#+-]|\d+\.(\s|$)")


def escape_error(format: str, message: Any) -> str | None:
    """Where a string of a chat message could mention, link, format or show a broken
    escape: None when every string is safe."""
    for text in _strings(message):
        if _BROADCAST.search(text):
            return f"a mass mention in {text[:80]!r}"
        error = None
        if format == "slack":
            if "<" in text:
                error = "an unescaped <"
            elif _SLACK_BARE_AMPERSAND.search(text):
                error = "a bare & (a cut escape?)"
            elif ">" in re.sub(r"(^|\n)> ", "", text):
                error = "a > that is not the quote marker"
        elif format == "discord":
            error = _discord_text_error(text)
        if error:
            return f"{error} in {text[:120]!r}"
    return None
