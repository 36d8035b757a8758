"""The web wing: the admin HTTP API (api), its OpenAPI document (openapi), what every
route shares (http), who is asking (auth), and the settings page: its links and sessions
(portal), its HTML, headers and files (page). Served by `outbox run` and `outbox serve`;
nothing here delivers."""

__all__: list[str] = []
