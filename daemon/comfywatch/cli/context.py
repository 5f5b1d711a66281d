"""What the commands share: the settings (``--config``, else ``$COMFYWATCH_CONFIG``, else
the default path) and logging."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from comfywatch.config import CONFIG_ENV_VAR, Settings, default_config_path, load_settings
from comfywatch.errors import ConfigError


def settings_of(args: argparse.Namespace) -> Settings:
    path: Path = args.config or default_config_path(os.environ)
    if not path.exists():
        raise ConfigError(f"no such file ({_where_from(args.config)})", file=str(path))
    return load_settings(path)


def _where_from(given: Path | None) -> str:
    """Which of --config, $COMFYWATCH_CONFIG and the default named the missing file."""
    if given is not None:
        return f"given with --config, which overrides ${CONFIG_ENV_VAR}"
    if os.environ.get(CONFIG_ENV_VAR):
        return f"from ${CONFIG_ENV_VAR}; --config PATH overrides it"
    return f"the default; name the config file with --config PATH or ${CONFIG_ENV_VAR}"


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
