"""What the commands share: the settings (``--config``, else ``$COMFYWATCH_CONFIG``, else
the default path) and logging."""

from __future__ import annotations

import argparse
import os
import sys

from comfywatch.config import Settings, default_config_path, load_settings


def settings_of(args: argparse.Namespace) -> Settings:
    return load_settings(args.config or default_config_path(os.environ))


def configure_logging(args: argparse.Namespace, settings: Settings) -> None:
    """Logging for the commands that log (the daemon, migrations, the health check); the
    data queries log nothing and skip structlog."""
    from comfywatch.logs import configure_logging as configure

    configure(
        args.log_level or settings.daemon.log_level,
        args.log_format or settings.daemon.log_format,
        # The daemon logs to stdout (journald, containers); others keep stdout for data.
        stream=sys.stdout if args.command == "run" else sys.stderr,
    )
