"""``comfywatch fake-server``: a fake ComfyUI (:mod:`comfywatch.testing`) until stopped.

A port in use (or an address it cannot listen on) is one line and exit status 2, as the
parser's own usage errors: pick another ``--port``."""

from __future__ import annotations

import argparse
import asyncio
import signal

from comfywatch.cli.output import EX_OK, EX_USAGE, err


def fake_server(args: argparse.Namespace) -> int:
    from comfywatch.testing import serve, sized_graph

    if args.graph_bytes is not None:
        try:
            sized_graph(args.graph_bytes)
        except ValueError as exc:
            err(f"--graph-bytes: {exc}")
            return EX_USAGE

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(
            args.host,
            args.port,
            args.run_time,
            stop,
            max_history_size=args.max_history,
            progress_steps=args.progress_steps,
            prefill=args.prefill,
            graph_bytes=args.graph_bytes,
        )

    try:
        asyncio.run(main())
    except OSError as exc:  # bind() or the address lookup, before it listened
        reason = exc.strerror or str(exc)
        err(f"fake-server: cannot listen on {args.host}:{args.port}: {reason} (try --port N)")
        return EX_USAGE
    return EX_OK
