"""Configuration: the main TOML file to validated, immutable settings.

``load_settings(path)`` reads the main file and returns one frozen :class:`Settings`;
every problem is a ConfigError naming the file, the dotted key and, where it can be
found, the line. Secrets (header values, webhook keys, database passwords) never appear
in an error message or a ``repr``. ``config_fingerprint(settings)`` costs a few
``os.stat`` calls, so the daemon can compare it with ``settings.fingerprint`` on every
tick and reload when a file changed. The spool files of ``jobs_dir`` are validated with
the same ``[[jobs]]`` rules (``jobs``) by :mod:`comfywatch.spool`, never loaded here.

Modules: ``settings`` (the frozen models, each also the schema of its table), ``schema``
(the rules and defaults of values), ``loader`` (files, resolution), ``jobs`` (``[[jobs]]``
tables), ``secrets``, ``document`` (located errors), ``keylines`` (key -> line),
``fingerprint``, ``redact``.
"""

from comfywatch.config.fingerprint import config_fingerprint
from comfywatch.config.keylines import KeyPath, format_key, key_lines, line_of_key
from comfywatch.config.loader import (
    CONFIG_ENV_VAR,
    DEFAULT_CONFIG_PATH,
    default_config_path,
    load_settings,
)
from comfywatch.config.redact import RedactedHeaders, redact_url, url_origin
from comfywatch.config.schema import DEFAULT_RETRY_SCHEDULE_S
from comfywatch.config.settings import (
    CommandHookSettings,
    DaemonSettings,
    HookSettings,
    JobSpec,
    ServerSettings,
    Settings,
    WebhookHookSettings,
)

__all__ = [
    "CONFIG_ENV_VAR",
    "DEFAULT_CONFIG_PATH",
    "DEFAULT_RETRY_SCHEDULE_S",
    "CommandHookSettings",
    "DaemonSettings",
    "HookSettings",
    "JobSpec",
    "KeyPath",
    "RedactedHeaders",
    "ServerSettings",
    "Settings",
    "WebhookHookSettings",
    "config_fingerprint",
    "default_config_path",
    "format_key",
    "key_lines",
    "line_of_key",
    "load_settings",
    "redact_url",
    "url_origin",
]
