"""The web wing: the admin HTTP API, its OpenAPI document, who is asking, and the
settings page (its links and sessions, its HTML and files). Served by `outbox run` and
`outbox serve`; nothing here delivers."""

__all__: list[str] = []
