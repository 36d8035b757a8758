"""Tests for outbox.config: settings from the environment."""

from __future__ import annotations

import io
import re
import sys
from pathlib import Path

import pytest

from outbox.config import ConfigError, Settings, parse_duration


class _Stream(io.StringIO):
    """A stderr stand-in whose isatty() answer is chosen by the test."""

    def __init__(self, *, tty: bool) -> None:
        super().__init__()
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


class TestDefaults:
    """`Settings.from_env` with an empty environment."""

    def test_documented_defaults(self) -> None:
        """An empty environment gives the documented defaults."""
        s = Settings.from_env({"OUTBOX_LOG_FORMAT": "json"})
        assert s.retry_delays == (300.0, 3600.0, 43200.0)
        assert (s.notify_url, s.notify_secret) == ("", "")
        assert s.http_timeout == 10.0
        assert s.concurrency == 64
        assert isinstance(s.concurrency, int)
        assert s.api_listen == ("127.0.0.1", 8080)
        assert s.allow_private_targets is False
        assert s.ca_file is None
        assert s.database_url == ""

    def test_log_format_json_off_a_tty(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """With no OUTBOX_LOG_FORMAT and stderr not a TTY, logs are json."""
        monkeypatch.setattr(sys, "stderr", _Stream(tty=False))
        assert Settings.from_env({}).log_format == "json"

    def test_log_format_console_on_a_tty(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """With no OUTBOX_LOG_FORMAT and stderr a TTY, logs are console."""
        monkeypatch.setattr(sys, "stderr", _Stream(tty=True))
        assert Settings.from_env({}).log_format == "console"

    def test_reads_os_environ_when_none(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """from_env() without a mapping reads os.environ."""
        monkeypatch.setenv("OUTBOX_CONCURRENCY", "7")
        monkeypatch.setenv("OUTBOX_LOG_FORMAT", "json")
        assert Settings.from_env().concurrency == 7


class TestValues:
    """`Settings.from_env` with good values."""

    @pytest.mark.parametrize(
        ("raw", "expected"),
        [
            ("0.2,0.4,0.8", (0.2, 0.4, 0.8)),
            ("1.5", (1.5,)),
            ("5, 10 ,20", (5.0, 10.0, 20.0)),
            ("0", (0.0,)),
            ("none", ()),
            ("", ()),
            ("5m,1h,12h", (300.0, 3600.0, 43200.0)),
            ("90s, 0.5 ,2d", (90.0, 0.5, 172800.0)),
            ("1.5m", (90.0,)),
        ],
    )
    def test_retry_delays(self, raw: str, expected: tuple[float, ...]) -> None:
        """OUTBOX_RETRY_DELAYS takes comma-separated seconds (decimals allowed) or
        DURATIONs."""
        s = Settings.from_env({"OUTBOX_RETRY_DELAYS": raw, "OUTBOX_LOG_FORMAT": "json"})
        assert s.retry_delays == pytest.approx(expected)
        assert len(s.retry_delays) == len(expected)

    def test_http_timeout_decimal(self) -> None:
        """OUTBOX_HTTP_TIMEOUT accepts decimals."""
        s = Settings.from_env({"OUTBOX_HTTP_TIMEOUT": "2.5", "OUTBOX_LOG_FORMAT": "json"})
        assert s.http_timeout == 2.5

    def test_concurrency(self) -> None:
        """OUTBOX_CONCURRENCY is read as an int."""
        s = Settings.from_env({"OUTBOX_CONCURRENCY": "16", "OUTBOX_LOG_FORMAT": "json"})
        assert s.concurrency == 16
        assert isinstance(s.concurrency, int)

    @pytest.mark.parametrize("raw", ["1", "true", "TRUE", "yes", "on"])
    def test_allow_private_true(self, raw: str) -> None:
        """Common spellings of true turn OUTBOX_ALLOW_PRIVATE_TARGETS on."""
        env = {"OUTBOX_ALLOW_PRIVATE_TARGETS": raw, "OUTBOX_LOG_FORMAT": "json"}
        assert Settings.from_env(env).allow_private_targets is True

    @pytest.mark.parametrize("raw", ["", "0", "false", "False", "no", "off"])
    def test_allow_private_false(self, raw: str) -> None:
        """Common spellings of false (and empty) leave OUTBOX_ALLOW_PRIVATE_TARGETS off."""
        env = {"OUTBOX_ALLOW_PRIVATE_TARGETS": raw, "OUTBOX_LOG_FORMAT": "json"}
        assert Settings.from_env(env).allow_private_targets is False

    @pytest.mark.parametrize(
        ("raw", "expected"),
        [
            ("0.0.0.0:9000", ("0.0.0.0", 9000)),
            ("localhost:1", ("localhost", 1)),
            ("[::1]:8081", ("::1", 8081)),
        ],
    )
    def test_api_listen(self, raw: str, expected: tuple[str, int]) -> None:
        """OUTBOX_API_LISTEN HOST:PORT (IPv6 in brackets) gives (host, port)."""
        env = {"OUTBOX_API_LISTEN": raw, "OUTBOX_LOG_FORMAT": "json"}
        assert Settings.from_env(env).api_listen == expected

    @pytest.mark.parametrize("raw", ["off", "OFF", " off "])
    def test_api_listen_off(self, raw: str) -> None:
        """OUTBOX_API_LISTEN=off disables the admin server (None)."""
        env = {"OUTBOX_API_LISTEN": raw, "OUTBOX_LOG_FORMAT": "json"}
        assert Settings.from_env(env).api_listen is None

    @pytest.mark.parametrize("raw", ["console", "json", "JSON"])
    def test_log_format(self, raw: str) -> None:
        """OUTBOX_LOG_FORMAT accepts console or json, case-insensitively."""
        assert Settings.from_env({"OUTBOX_LOG_FORMAT": raw}).log_format == raw.lower()

    def test_ca_file(self, tmp_path: Path) -> None:
        """An existing OUTBOX_CA_FILE is kept as given."""
        path = tmp_path / "ca.pem"
        path.write_text("-----BEGIN CERTIFICATE-----\n")
        env = {"OUTBOX_CA_FILE": str(path), "OUTBOX_LOG_FORMAT": "json"}
        assert Settings.from_env(env).ca_file == str(path)

    def test_outbox_database_url_beats_database_url(self) -> None:
        """OUTBOX_DATABASE_URL wins over DATABASE_URL."""
        env = {
            "OUTBOX_DATABASE_URL": "postgresql:///outbox",
            "DATABASE_URL": "postgresql:///app",
            "OUTBOX_LOG_FORMAT": "json",
        }
        assert Settings.from_env(env).database_url == "postgresql:///outbox"

    def test_database_url_fallback(self) -> None:
        """Without OUTBOX_DATABASE_URL, DATABASE_URL is used."""
        env = {"DATABASE_URL": "postgresql:///app", "OUTBOX_LOG_FORMAT": "json"}
        assert Settings.from_env(env).database_url == "postgresql:///app"


class TestErrors:
    """Each unusable value raises ConfigError naming the variable."""

    @pytest.mark.parametrize(
        ("name", "raw"),
        [
            ("OUTBOX_RETRY_DELAYS", "60,abc,3600"),
            ("OUTBOX_RETRY_DELAYS", "60,,3600"),
            ("OUTBOX_RETRY_DELAYS", "60,-1"),
            ("OUTBOX_RETRY_DELAYS", "-0.5"),
            ("OUTBOX_RETRY_DELAYS", "nan"),
            ("OUTBOX_RETRY_DELAYS", "5 minutes"),
            ("OUTBOX_RETRY_DELAYS", "1w"),
            ("OUTBOX_RETRY_DELAYS", "0m"),
            ("OUTBOX_NOTIFY_URL", "ftp://ops.example.com/hook"),
            ("OUTBOX_NOTIFY_URL", "ops.example.com/hook"),
            ("OUTBOX_NOTIFY_URL", "https:///nohost"),
            ("OUTBOX_HTTP_TIMEOUT", "ten"),
            ("OUTBOX_HTTP_TIMEOUT", "0"),
            ("OUTBOX_HTTP_TIMEOUT", "-1"),
            ("OUTBOX_HTTP_TIMEOUT", "nan"),
            ("OUTBOX_CONCURRENCY", "0"),
            ("OUTBOX_CONCURRENCY", "-4"),
            ("OUTBOX_CONCURRENCY", "many"),
            ("OUTBOX_API_LISTEN", "8080"),
            ("OUTBOX_API_LISTEN", "localhost:"),
            ("OUTBOX_API_LISTEN", "localhost:http"),
            ("OUTBOX_API_LISTEN", "127.0.0.1:65536"),
            ("OUTBOX_API_LISTEN", "127.0.0.1:-1"),
            ("OUTBOX_ALLOW_PRIVATE_TARGETS", "maybe"),
            ("OUTBOX_ALLOW_PRIVATE_TARGETS", "2"),
            ("OUTBOX_LOG_FORMAT", "xml"),
            ("OUTBOX_LOG_FORMAT", "text"),
        ],
    )
    def test_bad_value_names_variable(self, name: str, raw: str) -> None:
        """A bad value raises ConfigError and the message names the variable."""
        env = {"OUTBOX_LOG_FORMAT": "json", name: raw}
        with pytest.raises(ConfigError) as info:
            Settings.from_env(env)
        assert name in str(info.value)

    def test_missing_ca_file(self, tmp_path: Path) -> None:
        """An OUTBOX_CA_FILE that does not exist raises ConfigError naming the variable."""
        env = {"OUTBOX_CA_FILE": str(tmp_path / "missing.pem"), "OUTBOX_LOG_FORMAT": "json"}
        with pytest.raises(ConfigError, match="OUTBOX_CA_FILE"):
            Settings.from_env(env)

    def test_ca_file_is_a_directory(self, tmp_path: Path) -> None:
        """An OUTBOX_CA_FILE that is a directory raises ConfigError naming the variable."""
        env = {"OUTBOX_CA_FILE": str(tmp_path), "OUTBOX_LOG_FORMAT": "json"}
        with pytest.raises(ConfigError, match="OUTBOX_CA_FILE"):
            Settings.from_env(env)

    def test_config_error_is_value_error(self) -> None:
        """ConfigError is a ValueError, so callers catching ValueError see it."""
        assert issubclass(ConfigError, ValueError)

    def test_infinite_concurrency(self) -> None:
        """OUTBOX_CONCURRENCY=inf raises ConfigError naming the variable."""
        env = {"OUTBOX_CONCURRENCY": "inf", "OUTBOX_LOG_FORMAT": "json"}
        with pytest.raises(ConfigError, match="OUTBOX_CONCURRENCY"):
            Settings.from_env(env)

    @pytest.mark.parametrize("name", ["OUTBOX_RETRY_DELAYS", "OUTBOX_HTTP_TIMEOUT"])
    def test_infinite_seconds(self, name: str) -> None:
        """An infinite number of seconds is not a usable value: ConfigError naming the variable."""
        env = {name: "inf", "OUTBOX_LOG_FORMAT": "json"}
        with pytest.raises(ConfigError, match=name):
            Settings.from_env(env)

    def test_listen_non_ascii_digit_port(self) -> None:
        """A port of Unicode 'digits' that int() rejects raises ConfigError naming the variable."""
        env = {"OUTBOX_API_LISTEN": "127.0.0.1:\u00b2", "OUTBOX_LOG_FORMAT": "json"}
        with pytest.raises(ConfigError, match="OUTBOX_API_LISTEN"):
            Settings.from_env(env)


class TestDerived:
    """`lease_seconds`, `per_webhook_limit` and `per_account_limit`."""

    def test_lease_within_contract_by_default(self) -> None:
        """With the default 10 s timeout a lease is at most 30 s (crash recovery promise)."""
        s = Settings.from_env({"OUTBOX_LOG_FORMAT": "json"})
        assert s.lease_seconds <= 30
        assert s.lease_seconds > s.http_timeout

    @pytest.mark.parametrize("timeout", [0.001, 0.5, 2, 10, 14.9, 15, 30, 120, 3600])
    def test_lease_outlasts_timeout(self, timeout: float) -> None:
        """A lease always lasts longer than one HTTP attempt can take."""
        s = Settings(http_timeout=timeout)
        assert s.lease_seconds > timeout

    @pytest.mark.parametrize("timeout", [10, 30, 300])
    def test_lease_leaves_room_to_record(self, timeout: float) -> None:
        """The lease leaves several seconds beyond the timeout to record the result."""
        assert Settings(http_timeout=timeout).lease_seconds >= timeout + 5

    def test_per_webhook_limit_default(self) -> None:
        """With concurrency 64 one webhook gets a bounded share, less than all 64."""
        s = Settings.from_env({"OUTBOX_LOG_FORMAT": "json"})
        assert s.concurrency == 64
        assert 1 <= s.per_webhook_limit < s.concurrency

    @pytest.mark.parametrize("concurrency", [16, 64, 256, 1000])
    def test_per_webhook_limit_is_a_share(self, concurrency: int) -> None:
        """For larger pools one webhook may use at most half of the slots, and at least one."""
        s = Settings(concurrency=concurrency)
        assert 1 <= s.per_webhook_limit <= concurrency // 2

    @pytest.mark.parametrize(
        ("concurrency", "per_webhook", "per_account"),
        [(1, 2, 2), (4, 2, 2), (16, 2, 8), (64, 8, 32), (256, 32, 128)],
    )
    def test_per_account_limit(self, concurrency: int, per_webhook: int, per_account: int) -> None:
        """An account's webhooks together get half the slots, and at least one webhook's
        share: however many webhooks it has, it leaves slots for other accounts."""
        s = Settings(concurrency=concurrency)
        assert (s.per_webhook_limit, s.per_account_limit) == (per_webhook, per_account)
        if concurrency >= 4:
            assert s.per_account_limit < concurrency


class TestDurations:
    """`parse_duration` and the settings that take a DURATION."""

    @pytest.mark.parametrize(
        ("raw", "seconds"),
        [("90s", 90), ("15m", 900), ("12h", 43200), ("30d", 2592000), ("45", 45), ("1.5h", 5400)],
    )
    def test_forms(self, raw: str, seconds: float) -> None:
        """Seconds alone, or a number with s, m, h or d."""
        assert parse_duration(raw) == seconds

    @pytest.mark.parametrize("raw", ["", "5x", "-1d", "1 week", "d", "0", "0s", "1e3"])
    def test_not_durations(self, raw: str) -> None:
        """Anything else is refused with the input quoted."""
        with pytest.raises(ValueError, match=re.escape(repr(raw))):
            parse_duration(raw)

    def test_retention_default_and_off(self) -> None:
        """OUTBOX_RETENTION keeps 30 days by default; off keeps everything (None)."""
        assert Settings.from_env({"OUTBOX_LOG_FORMAT": "json"}).retention == 30 * 86400
        env = {"OUTBOX_RETENTION": "OFF", "OUTBOX_LOG_FORMAT": "json"}
        assert Settings.from_env(env).retention is None
        env["OUTBOX_RETENTION"] = "12h"
        assert Settings.from_env(env).retention == 43200

    def test_bad_retention_names_the_variable(self) -> None:
        """A bad OUTBOX_RETENTION is named, with the forms it takes."""
        with pytest.raises(ConfigError, match="OUTBOX_RETENTION: 'forever' is not a duration"):
            Settings.from_env({"OUTBOX_RETENTION": "forever", "OUTBOX_LOG_FORMAT": "json"})


class TestPooler:
    """OUTBOX_DATABASE_POOLER and OUTBOX_LISTEN_DATABASE_URL."""

    BASE = {"OUTBOX_DATABASE_URL": "postgresql://pooler:6432/app", "OUTBOX_LOG_FORMAT": "json"}

    def test_direct_by_default(self) -> None:
        """Without a pooler, everything, LISTEN too, goes to OUTBOX_DATABASE_URL."""
        s = Settings.from_env(self.BASE)
        assert not s.pooled and s.connect_options == {}
        assert s.listen_url == "postgresql://pooler:6432/app"

    def test_pgbouncer_without_a_direct_url_polls(self) -> None:
        """Behind PgBouncer with no direct URL there is nowhere to LISTEN (None), and
        nothing is prepared."""
        s = Settings.from_env({**self.BASE, "OUTBOX_DATABASE_POOLER": "pgbouncer"})
        assert s.pooled and s.listen_url is None
        assert s.connect_options == {"prepare_threshold": None}

    def test_pgbouncer_with_a_direct_url_listens_there(self) -> None:
        """OUTBOX_LISTEN_DATABASE_URL is where LISTEN goes, pooled or not."""
        env = {
            **self.BASE,
            "OUTBOX_DATABASE_POOLER": "pgbouncer",
            "OUTBOX_LISTEN_DATABASE_URL": "postgresql://db:5432/app",
        }
        assert Settings.from_env(env).listen_url == "postgresql://db:5432/app"

    @pytest.mark.parametrize("raw", ["", "none", "NONE"])
    def test_no_pooler(self, raw: str) -> None:
        """Empty or none: no pooler."""
        assert not Settings.from_env({**self.BASE, "OUTBOX_DATABASE_POOLER": raw}).pooled

    def test_unknown_pooler_is_named(self) -> None:
        """A pooler we do not know is refused, with the values we do."""
        with pytest.raises(ConfigError, match="OUTBOX_DATABASE_POOLER: 'pgpool' is not none or"):
            Settings.from_env({**self.BASE, "OUTBOX_DATABASE_POOLER": "pgpool"})


class TestAutoDisableAfter:
    """OUTBOX_AUTO_DISABLE_AFTER: a DURATION, or off."""

    def test_default_is_five_days(self) -> None:
        assert Settings.from_env({"OUTBOX_LOG_FORMAT": "json"}).auto_disable_after == 432000

    @pytest.mark.parametrize(
        ("raw", "seconds"),
        [("90", 90), ("90s", 90), ("15m", 900), ("12h", 43200), ("30d", 2592000), ("0.5s", 0.5)],
    )
    def test_durations(self, raw: str, seconds: float) -> None:
        env = {"OUTBOX_LOG_FORMAT": "json", "OUTBOX_AUTO_DISABLE_AFTER": raw}
        assert Settings.from_env(env).auto_disable_after == seconds

    def test_off(self) -> None:
        env = {"OUTBOX_LOG_FORMAT": "json", "OUTBOX_AUTO_DISABLE_AFTER": "OFF"}
        assert Settings.from_env(env).auto_disable_after is None

    @pytest.mark.parametrize("raw", ["soon", "5 days", "-1d", "0", "5w", "1e3"])
    def test_bad_values_are_named(self, raw: str) -> None:
        """Anything else is refused, naming the variable and the forms it takes."""
        env = {"OUTBOX_LOG_FORMAT": "json", "OUTBOX_AUTO_DISABLE_AFTER": raw}
        with pytest.raises(ConfigError, match=r"OUTBOX_AUTO_DISABLE_AFTER: .* is not a duration"):
            Settings.from_env(env)


class TestSchemaMismatch:
    """OUTBOX_SCHEMA_MISMATCH: exit (the default) or wait."""

    def test_default_is_exit(self) -> None:
        assert Settings.from_env({"OUTBOX_LOG_FORMAT": "json"}).schema_mismatch == "exit"

    @pytest.mark.parametrize(
        ("raw", "value"), [("wait", "wait"), (" WAIT ", "wait"), ("exit", "exit")]
    )
    def test_values(self, raw: str, value: str) -> None:
        env = {"OUTBOX_LOG_FORMAT": "json", "OUTBOX_SCHEMA_MISMATCH": raw}
        assert Settings.from_env(env).schema_mismatch == value

    def test_anything_else_is_named(self) -> None:
        env = {"OUTBOX_LOG_FORMAT": "json", "OUTBOX_SCHEMA_MISMATCH": "restart"}
        with pytest.raises(
            ConfigError, match="OUTBOX_SCHEMA_MISMATCH: 'restart' is not exit or wait"
        ):
            Settings.from_env(env)


class TestPortalSettings:
    """The settings page's frame ancestors and branding (contract 8, 20)."""

    def test_defaults_refuse_framing_and_brand_nothing(self) -> None:
        settings = Settings.from_env({})
        assert settings.portal_frame_ancestors == ()
        assert settings.portal_product_name == ""
        assert settings.portal_accent_color == ""

    def test_values(self) -> None:
        """Origins are split on any whitespace; the colour is kept in lower case."""
        settings = Settings.from_env(
            {
                "OUTBOX_PORTAL_FRAME_ANCESTORS": " https://app.example.com\thttp://localhost:3000 "
                "https://*.example.org",
                "OUTBOX_PORTAL_PRODUCT_NAME": " AutoReach ",
                "OUTBOX_PORTAL_ACCENT_COLOR": "#7A3E9D",
            }
        )
        assert settings.portal_frame_ancestors == (
            "https://app.example.com",
            "http://localhost:3000",
            "https://*.example.org",
        )
        assert settings.portal_product_name == "AutoReach"
        assert settings.portal_accent_color == "#7a3e9d"

    @pytest.mark.parametrize(
        ("name", "raw"),
        [
            ("OUTBOX_PORTAL_FRAME_ANCESTORS", "app.example.com"),
            ("OUTBOX_PORTAL_FRAME_ANCESTORS", "https://app.example.com/settings"),
            ("OUTBOX_PORTAL_FRAME_ANCESTORS", "*"),
            ("OUTBOX_PORTAL_FRAME_ANCESTORS", "'none'"),
            ("OUTBOX_PORTAL_FRAME_ANCESTORS", "https://ok.example.com, https://b.example.com"),
            ("OUTBOX_PORTAL_ACCENT_COLOR", "blue"),
            ("OUTBOX_PORTAL_ACCENT_COLOR", "#12345"),
            ("OUTBOX_PORTAL_ACCENT_COLOR", "#1234567"),
            ("OUTBOX_PORTAL_ACCENT_COLOR", "1f5fd6"),
            ("OUTBOX_PORTAL_PRODUCT_NAME", "x" * 61),
            ("OUTBOX_PORTAL_PRODUCT_NAME", "two\nlines"),
        ],
    )
    def test_bad_values_name_the_variable(self, name: str, raw: str) -> None:
        with pytest.raises(ConfigError) as raised:
            Settings.from_env({name: raw})
        message = str(raised.value)
        assert message.startswith(f"{name}: ") and "\n" not in message


class TestNotify:
    """OUTBOX_NOTIFY_URL and OUTBOX_NOTIFY_SECRET go together; the secret is long enough."""

    SECRET = "whsec_ops_secret_0123"

    @pytest.mark.parametrize("url", ["http://10.0.0.5:8000/outbox", "https://ops.example.com/in"])
    def test_http_or_https_private_too(self, url: str) -> None:
        """Plain http and private addresses are fine: it is the operator's own endpoint."""
        env = {"OUTBOX_NOTIFY_URL": url, "OUTBOX_NOTIFY_SECRET": self.SECRET}
        s = Settings.from_env(env | {"OUTBOX_LOG_FORMAT": "json"})
        assert (s.notify_url, s.notify_secret) == (url, self.SECRET)

    @pytest.mark.parametrize(
        ("env", "message"),
        [
            (
                {"OUTBOX_NOTIFY_URL": "https://ops.example.com/in"},
                "OUTBOX_NOTIFY_SECRET: must be set with OUTBOX_NOTIFY_URL",
            ),
            (
                {"OUTBOX_NOTIFY_SECRET": SECRET},
                "OUTBOX_NOTIFY_URL: must be set with OUTBOX_NOTIFY_SECRET",
            ),
            (
                {
                    "OUTBOX_NOTIFY_URL": "https://ops.example.com/in",
                    "OUTBOX_NOTIFY_SECRET": "short",
                },
                "OUTBOX_NOTIFY_SECRET: must be at least 16 characters, not 5",
            ),
        ],
    )
    def test_one_without_the_other_or_a_short_secret(
        self, env: dict[str, str], message: str
    ) -> None:
        """Half a setup, or a secret under 16 characters, is an error naming the variable
        (and never showing the secret)."""
        with pytest.raises(ConfigError) as info:
            Settings.from_env(env | {"OUTBOX_LOG_FORMAT": "json"})
        assert str(info.value) == message
