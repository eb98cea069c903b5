"""Starting an aiohttp app on a loopback port, shared by the stand-in servers."""

from __future__ import annotations

from aiohttp import web


async def serve(app: web.Application, host: str, port: int, **runner_kwargs) -> tuple[web.AppRunner, int]:
    """Run ``app`` on ``host:port`` (port 0: a free one); returns the runner and the bound port."""
    runner = web.AppRunner(app, access_log=None, **runner_kwargs)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
