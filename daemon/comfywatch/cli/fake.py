"""``comfywatch fake-server``: a fake ComfyUI (:mod:`comfywatch.testing`) until stopped."""

from __future__ import annotations

import argparse
import asyncio
import signal

from comfywatch.cli.output import EX_OK


def fake_server(args: argparse.Namespace) -> int:
    from comfywatch.testing import serve

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(args.host, args.port, args.run_time, stop)

    asyncio.run(main())
    return EX_OK
