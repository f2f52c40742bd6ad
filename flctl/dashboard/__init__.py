"""The web dashboard: an ASGI app that is an Admin client of the coordinator, like the CLI."""

__all__: list[str] = []
