"""Development tools: used by `make run`, `make test` and `make bench`, never shipped.

Nothing here is in the wheel or the image; the sidecar never imports it.
"""
