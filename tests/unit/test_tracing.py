"""outbox.tracing: when traces are asked for, and what a bad OpenTelemetry setting says.
(tests/e2e/test_tracing.py exports real spans.)"""

from __future__ import annotations

import pytest

from outbox import tracing
from outbox.config import ConfigError


class TestEnabled:
    @pytest.mark.parametrize(
        ("env", "on"),
        [
            ({}, False),
            ({"OTEL_EXPORTER_OTLP_ENDPOINT": " "}, False),
            ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, True),
            ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, True),
            (
                {
                    "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318",
                    "OTEL_SDK_DISABLED": "TRUE",
                },
                False,
            ),
        ],
    )
    def test_an_endpoint_turns_it_on_and_the_sdk_switch_off(
        self, env: dict[str, str], on: bool
    ) -> None:
        assert tracing.enabled(env) is on

    def test_without_an_endpoint_the_hooks_stay_the_ones_that_do_nothing(self) -> None:
        tracing.start({})
        assert type(tracing.hooks) is tracing.Hooks
        assert tracing.hooks.clock() == 0


class TestSettings:
    def test_a_setting_the_sdk_refuses_is_a_config_error(self) -> None:
        env = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9",
            "OTEL_BSP_MAX_QUEUE_SIZE": "10",
            "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "20",
        }
        with pytest.MonkeyPatch.context() as patch:
            for name, value in env.items():
                patch.setenv(name, value)
            with pytest.raises(ConfigError, match="OpenTelemetry settings: max_export_batch_size"):
                tracing.start(env)
        assert type(tracing.hooks) is tracing.Hooks
