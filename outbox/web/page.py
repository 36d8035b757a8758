"""The settings page: its HTML (templates in static/, filled in with every value
escaped), its security headers (CSP), its files, and its routes: one-time portal links,
the page itself, Sign out.

A portal link is opened in two steps: a GET shows a Continue button and uses nothing
up (mail scanners and chat previews fetch links), and only that button's POST uses the
link and sets the session cookie. The page then calls the JSON API (outbox.web.api) with
that cookie; outbox.web.auth says how such calls are judged. Inside an iframe of an origin
that OUTBOX_PORTAL_FRAME_ANCESTORS allows, the POST answers the page itself with its
session in it instead (see outbox.web.portal).
"""

from __future__ import annotations

import hmac
import html
import re
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import structlog
from aiohttp import web

from outbox import errors
from outbox.config import Settings
from outbox.events import EVENTS
from outbox.retry import retry_note, series
from outbox.web import auth, http, portal

__all__ = [
    "CONTENT_SECURITY_POLICY",
    "HEADERS",
    "LINK_KEYS",
    "PAGE_HEADERS",
    "SETTINGS",
    "STATIC_FILES",
    "add_routes",
    "continue_page",
    "intro",
    "message_page",
    "page_headers",
    "settings_page",
    "signed_out_page",
    "static_path",
    "theme_css",
]

log = structlog.get_logger("outbox.page")

LINK_KEYS = web.AppKey("link_keys", portal.LinkKeys)
# What the page says about retries comes from the settings in force.
SETTINGS = web.AppKey("settings", Settings)
# Every page's and file's security headers: who may frame them comes from the settings.
HEADERS = web.AppKey("page_headers", dict[str, str])
# The branding stylesheet: the accent colour is fixed at start.
THEME = web.AppKey("theme_css", str)


STATIC_DIR = Path(__file__).with_name("static")
# What /static/{name} serves; the HTML templates are only ever filled in and served
# by their own routes.
STATIC_FILES = {
    "webhooks.css": "text/css; charset=utf-8",
    "webhooks.js": "text/javascript; charset=utf-8",
}

CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)
# Sent with every page, error page and static file, unless frames are allowed (see
# page_headers).
PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}


def page_headers(frame_ancestors: tuple[str, ...]) -> dict[str, str]:
    """PAGE_HEADERS, or with origins that may frame the page, a policy naming them and
    no X-Frame-Options (whose DENY would win over the policy in some browsers)."""
    if not frame_ancestors:
        return dict(PAGE_HEADERS)
    policy = CONTENT_SECURITY_POLICY.replace(
        "frame-ancestors 'none'", "frame-ancestors " + " ".join(frame_ancestors)
    )
    headers = {**PAGE_HEADERS, "Content-Security-Policy": policy}
    del headers["X-Frame-Options"]
    return headers


@cache
def _template(name: str) -> str:
    return (STATIC_DIR / name).read_text()


def _fill(name: str, **values: str) -> str:
    """The template with each ``{{key}}`` replaced by its value, escaped for HTML."""
    return re.sub(r"\{\{(\w+)\}\}", lambda m: html.escape(values[m[1]]), _template(name))


def _who(account_id: str, display_name: str | None) -> dict[str, str]:
    """How the page names whose settings these are: the display name, or the id."""
    if display_name:
        return {"account_prefix": "", "account": display_name}
    return {"account_prefix": "Account ", "account": account_id}


def settings_page(current: portal.Session, settings: Settings, session_token: str = "") -> str:
    """The Settings > Webhooks page for a signed-in browser; what it says about retries
    comes from the settings in force. ``session_token`` is given only inside a frame,
    where the page must send its session itself (see the module's docstring)."""
    product = settings.portal_product_name
    return _fill(
        "webhooks.html",
        **_who(current.account_id, current.display_name),
        csrf_token=current.csrf_token,
        session_token=session_token,
        max_attempts=str(len(settings.retry_delays) + 1),
        retry_note=retry_note(settings),
        product=product,
        title=f"Webhooks · Settings · {product}" if product else "Webhooks · Settings",
        intro=intro(product),
        events=series(list(EVENTS.values())),
    )


def intro(product: str) -> str:
    """The page's first words: what a webhook is, for the events of the catalogue."""
    where = f" in {product}" if product else ""
    return (
        f"Receive real-time notifications when important events happen{where}. An HTTP "
        "request is sent to a URL you specify whenever the event you choose happens."
    )


def theme_css(accent: str) -> str:
    """The stylesheet that brands the page: the accent colour (#rrggbb) for buttons and
    links, with a darker shade for hovering and the text colour that reads on it."""
    if not accent:
        return "/* the page's own colours */\n"
    red, green, blue = (int(accent[i : i + 2], 16) for i in (1, 3, 5))
    dark = "#" + "".join(f"{round(c * 0.8):02x}" for c in (red, green, blue))

    def linear(c: int) -> float:
        v = c / 255
        return v / 12.92 if v <= 0.03928 else ((v + 0.055) / 1.055) ** 2.4

    luminance = 0.2126 * linear(red) + 0.7152 * linear(green) + 0.0722 * linear(blue)
    # White on the accent, unless black reads better on it (WCAG contrast).
    on_accent = (
        "#ffffff" if (1.05 / (luminance + 0.05)) >= ((luminance + 0.05) / 0.05) else "#111111"
    )
    return (
        f":root {{\n  --primary: {accent};\n  --primary-dark: {dark};\n"
        f"  --focus: {accent};\n  --on-primary: {on_accent};\n}}\n"
    )


def continue_page(claims: portal.Claims) -> str:
    """What fetching a link answers: a button that signs in with it.

    Pressing it also makes the sign-in a navigation begun on this site, whose redirect
    to the settings page sends the new SameSite=Strict cookie; a navigation begun on
    the host application's site would not.
    """
    who = _who(claims.account_id, claims.display_name)
    return _fill(
        "continue.html", account=who["account"], account_prefix_lower=who["account_prefix"].lower()
    )


def signed_out_page() -> str:
    return message_page(
        "You are signed out",
        "This browser no longer has access to your webhook settings. To open them "
        "again, go back to your account and open Settings > Webhooks.",
    )


def message_page(title: str, message: str) -> str:
    """A page that says why the settings page cannot be shown."""
    return _fill("message.html", title=title, message=message)


def static_path(name: str) -> Path | None:
    """The file /static/{name} serves, or None."""
    return STATIC_DIR / name if name in STATIC_FILES else None


def _headers(request: web.Request) -> dict[str, str]:
    headers: dict[str, str] = request.app[HEADERS]
    return headers


def _page(
    request: web.Request,
    text: str,
    status: int = 200,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    sent = {**_headers(request), "Cache-Control": "no-store", **(headers or {})}
    return web.Response(text=text, status=status, content_type="text/html", headers=sent)


def _unavailable_page(request: web.Request) -> web.Response:
    message = "The database is not answering. Try again in a moment."
    return _page(request, message_page("Settings are unavailable", message), 503)


def _refused_page(request: web.Request, exc: portal.LinkRefused) -> web.Response:
    log.info("portal: link refused", reason=exc.reason)
    return _page(request, message_page(exc.title, exc.explanation), exc.status)


def _framed(request: web.Request) -> bool:
    """Whether this navigation loads the page inside a frame that the settings allow
    (browsers send Sec-Fetch-Dest; the CSP keeps every other origin out)."""
    dest = request.headers.get("Sec-Fetch-Dest", "")
    return bool(request.app[SETTINGS].portal_frame_ancestors) and dest in ("iframe", "frame")


def _set_session_cookie(
    request: web.Request, response: web.StreamResponse, value: str, max_age: int
) -> None:
    secure = http.secure(request)
    response.set_cookie(
        portal.cookie_name(secure),
        value,
        max_age=max_age,
        path="/",
        httponly=True,
        samesite="Strict",
        secure=secure,
    )


async def _checked_link(request: web.Request) -> portal.Claims:
    """The link's claims, checked against the key this process keeps: garbage and
    expired links are refused before any connection is taken from the pool."""
    keys = request.app[LINK_KEYS]
    return await keys.check(request.match_info["token"], lambda: http.connection(request))


async def show_portal_link(request: web.Request) -> web.Response:
    """Fetching a link uses nothing up: a page whose Continue button signs in."""
    try:
        claims = await _checked_link(request)
    except portal.LinkRefused as exc:
        return _refused_page(request, exc)
    except psycopg.OperationalError:
        return _unavailable_page(request)
    # The button's POST must say where it comes from (see same_origin): a page whose
    # referrer policy is no-referrer makes browsers send Origin: null.
    return _page(request, continue_page(claims), headers={"Referrer-Policy": "same-origin"})


async def open_portal_link(request: web.Request) -> web.Response:
    """Use a one-time link: a session cookie for its account, then the settings page."""
    hosts = {request.host, urlsplit(request.app[http.PUBLIC_URL]).netloc}
    if not portal.same_origin(request.headers, hosts):
        # Another site posting a link of its own would sign this browser in to the
        # account of that site's choosing.
        log.info("portal: cross-site sign-in refused", origin=request.headers.get("Origin"))
        message = (
            "Signing in must start from the page the link opens. Open your link again "
            "and press Continue."
        )
        return _page(request, message_page("This sign-in was not completed", message), 403)
    try:
        await _checked_link(request)
        async with http.connection(request) as conn:
            current = await portal.open_link(conn, request.match_info["token"])
    except portal.LinkRefused as exc:
        return _refused_page(request, exc)
    except psycopg.OperationalError:
        return _unavailable_page(request)
    framed = _framed(request)
    log.info("portal: link opened", account_id=current.account_id, framed=framed)
    if framed:
        # A cookie set here would be a third-party cookie, which browsers may drop: the
        # page carries its session itself, in memory, for as long as it is open.
        page = settings_page(current, request.app[SETTINGS], session_token=current.cookie)
        return _page(request, page)
    response = _page(request, "", 303, {"Location": "../settings/webhooks"})
    _set_session_cookie(request, response, current.cookie, portal.SESSION_SECONDS)
    return response


async def show_settings(request: web.Request) -> web.Response:
    """Settings > Webhooks, for a browser signed in by a portal link."""
    cookie = auth.session_cookie(request)
    current = None
    if cookie:
        try:
            current = await auth.session_of(request, cookie)
        except psycopg.OperationalError:
            return _unavailable_page(request)
    if current is None:
        message = (
            "This page opens from a one-time link, and stays signed in for "
            f"{portal.SESSION_SECONDS // 3600} hours. Go back to your account and open "
            "Settings > Webhooks again to get a new link."
        )
        return _page(request, message_page("You are not signed in", message), 401)
    return _page(request, settings_page(current, request.app[SETTINGS]))


async def sign_out(request: web.Request) -> web.Response:
    """The page's Sign out button: ends this browser's session and says so. The form
    carries the session's CSRF token, so that no other page can sign anyone out; inside
    a frame it also carries the session itself, which no cookie does there."""
    cookie = await _form_field(request, "session") or auth.session_cookie(request)
    if cookie and portal.well_formed(cookie):
        sent = await _form_field(request, "csrf_token")
        try:
            # Looked up as every session is (auth.session_of): a made-up cookie waits in
            # the strangers' lane here too.
            current = await auth.session_of(request, cookie)
            if current is not None:
                if not hmac.compare_digest(
                    sent.encode(errors="replace"), current.csrf_token.encode()
                ):
                    message = "Reload the settings page and press Sign out again."
                    still = message_page("You are still signed in", message)
                    return _page(request, still, 403)
                async with http.connection(request) as conn:
                    await portal.end_session(conn, cookie)
                log.info("portal: signed out", account_id=current.account_id)
        except psycopg.OperationalError:
            return _unavailable_page(request)
    response = _page(request, signed_out_page())
    _set_session_cookie(request, response, "", 0)
    return response


async def _form_field(request: web.Request, name: str) -> str:
    """A field of a form the page posted; "" when the body is no such form."""
    try:
        form = await request.post()
    except (ValueError, web.HTTPRequestEntityTooLarge):
        return ""
    value = form.get(name)
    return value if isinstance(value, str) else ""


async def static_file(request: web.Request) -> web.FileResponse:
    """The settings page's stylesheet and script."""
    name = request.match_info["name"]
    path = static_path(name)
    if path is None:
        raise errors.NotFound(f"file {name} not found")
    headers = {
        **_headers(request),
        "Content-Type": STATIC_FILES[name],
        "Cache-Control": "no-cache",
    }
    return web.FileResponse(path, headers=headers)


async def theme(request: web.Request) -> web.Response:
    """The stylesheet that brands the page (OUTBOX_PORTAL_ACCENT_COLOR)."""
    headers = {**_headers(request), "Cache-Control": "no-cache"}
    return web.Response(text=request.app[THEME], content_type="text/css", headers=headers)


def add_routes(app: web.Application, settings: Settings) -> None:
    """The page's routes, on the admin server's ``app``."""
    app[LINK_KEYS] = portal.LinkKeys()
    app[SETTINGS] = settings
    app[THEME] = theme_css(settings.portal_accent_color)
    app[HEADERS] = page_headers(settings.portal_frame_ancestors)
    add = app.router.add_route
    add("GET", "/static/theme.css", theme)
    add("GET", "/portal/{token}", show_portal_link)
    add("POST", "/portal/{token}", open_portal_link)
    add("GET", "/settings/webhooks", show_settings)
    add("POST", "/settings/signout", sign_out)
    add("GET", "/static/{name}", static_file)
