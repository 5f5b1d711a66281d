"""Loading: the main config file to one frozen :class:`Settings`.

``load_settings(path)`` reads the main file, validates each table as its settings model,
then resolves what depends on the file's place and the environment: relative paths
against the file's folder, webhook secrets, commands on ``PATH``, hook and server names,
``[daemon]`` defaults for servers and jobs. Every problem is a ConfigError naming file,
key and line; one load reports all of them (each table and each check is tried, whatever
the others gave; a broken table does not make its names unknown elsewhere). The spool
files of ``jobs_dir`` are not read here: the daemon ingests them (:mod:`comfywatch.spool`),
so nothing in the spool can stop a load.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
from collections.abc import Collection, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

from comfywatch.config.document import (
    Document,
    Problems,
    check_top_level,
    os_reason,
    read_document,
    toml_type,
    validate_table,
)
from comfywatch.config.fingerprint import StatKey, stat_key
from comfywatch.config.jobs import check_hook_names, job_specs
from comfywatch.config.keylines import KeyPath
from comfywatch.config.secrets import secret_from_env, secret_from_file
from comfywatch.config.settings import (
    CommandHookSettings,
    DaemonSettings,
    HookSettings,
    ServerSettings,
    Settings,
    WebhookHookSettings,
)
from comfywatch.errors import ConfigError
from comfywatch.leases import lease_problem

__all__ = ["CONFIG_ENV_VAR", "DEFAULT_CONFIG_PATH", "default_config_path", "load_settings"]

CONFIG_ENV_VAR = "COMFYWATCH_CONFIG"
DEFAULT_CONFIG_PATH = Path("/etc/comfywatch/comfywatch.toml")

_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,255}")  # names are stored in VARCHAR(255)
_URL_SCHEME_RE = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?P<rest>.*)", re.DOTALL)
_MAIN_KEYS = ("daemon", "servers", "hooks", "jobs")


def load_settings(path: str | Path, *, env: Mapping[str, str] | None = None) -> Settings:
    """Reads and validates the config file at ``path`` (never the spool of ``jobs_dir``).

    ``env`` (default ``os.environ``) supplies ``secret_env`` values and the ``PATH`` that
    bare command names are looked up on. Raises ConfigError, and only ConfigError.
    """
    try:
        absolute = Path(path).absolute()
    except (OSError, ValueError):
        raise ConfigError("cannot resolve the config file's path", file=str(path)) from None
    return _Loader(absolute, os.environ if env is None else env).load()


def default_config_path(env: Mapping[str, str]) -> Path:
    """The ``--config`` default: ``$COMFYWATCH_CONFIG``, else /etc/comfywatch/comfywatch.toml."""
    value = env.get(CONFIG_ENV_VAR, "")
    return Path(value) if value else DEFAULT_CONFIG_PATH


class _Loader:
    """One load: reads the files, validates them and resolves what depends on the host."""

    def __init__(self, path: Path, env: Mapping[str, str]) -> None:
        self.path = path
        self.folder = path.parent
        self.env = env

    def load(self) -> Settings:
        main_key = stat_key(self.path)  # the fingerprint is taken before reading
        doc = read_document(self.path, kind="config file")
        problems = Problems()
        problems.check(check_top_level, doc, _MAIN_KEYS)
        as_written = problems.check(
            validate_table, doc, DaemonSettings, doc.data.get("daemon", {}), ("daemon",)
        )
        server_tables = self._table_of_tables(doc, "servers", problems)
        hook_tables = self._table_of_tables(doc, "hooks", problems)
        servers = self._servers(doc, server_tables, as_written, problems)
        hooks, secret_keys = self._hooks(doc, hook_tables, problems)
        # The names written, valid or not: a broken table is one mistake, not one per use.
        hook_names = None if hook_tables is None else tuple(hook_tables)
        daemon = None
        if as_written is not None:
            daemon = problems.check(self._daemon, doc, as_written, hook_names)
        jobs = problems.check(
            job_specs,
            doc,
            servers=None if server_tables is None else tuple(server_tables),
            hooks=hook_names,
            default_hooks=() if as_written is None else as_written.default_hooks,
        )
        problems.raise_all()
        assert daemon is not None and jobs is not None  # no problem: all were read
        return Settings(
            path=self.path,
            daemon=daemon,
            servers=MappingProxyType(servers),
            hooks=MappingProxyType(hooks),
            jobs=tuple(located.job for located in jobs),
            fingerprint=(main_key, tuple(secret_keys)),
        )

    def _resolve(self, path: str | Path) -> Path:
        path = Path(path)
        return path if path.is_absolute() else self.folder / path

    @staticmethod
    def _table_of_tables(doc: Document, key: str, problems: Problems) -> dict[str, Any] | None:
        """The named tables under ``key``, every name written (each bad name reported);
        None if ``key`` is not a table (reported)."""
        tables = doc.data.get(key, {})
        if not isinstance(tables, dict):
            problems.add(doc.error((key,), f"must be a table of named tables, e.g. [{key}.name]"))
            return None
        for name in tables:
            if not _NAME_RE.fullmatch(name):
                problems.add(
                    doc.error(
                        (key, name),
                        "names may only use letters, digits, '_', '.' and '-' (255 at most)",
                    )
                )
        return tables

    def _servers(
        self,
        doc: Document,
        tables: dict[str, Any] | None,
        daemon: DaemonSettings | None,
        problems: Problems,
    ) -> dict[str, ServerSettings]:
        defaults = {} if daemon is None else {"max_history_fetches": daemon.max_history_fetches}
        servers: dict[str, ServerSettings] = {}
        for name, table in (tables or {}).items():
            if not _NAME_RE.fullmatch(name):
                continue  # reported
            server = problems.check(
                validate_table,
                doc,
                ServerSettings,
                table,
                ("servers", name),
                given={"name": name},
                defaults=defaults,
            )
            if server is not None:
                servers[name] = server
        return servers

    def _hooks(
        self, doc: Document, tables: dict[str, Any] | None, problems: Problems
    ) -> tuple[dict[str, HookSettings], list[StatKey]]:
        hooks: dict[str, HookSettings] = {}
        secret_keys: list[StatKey] = []
        for name, table in (tables or {}).items():
            if not _NAME_RE.fullmatch(name):
                continue  # reported
            hook = problems.check(self._hook, doc, name, table, secret_keys)
            if hook is not None:
                hooks[name] = hook
        return hooks, secret_keys

    def _hook(
        self, doc: Document, name: str, table: object, secret_keys: list[StatKey]
    ) -> HookSettings:
        loc: KeyPath = ("hooks", name)
        if not isinstance(table, dict):
            raise doc.error(loc, f"must be a table (got {toml_type(table)})")
        kind = table.get("type")
        given = {"name": name}
        if kind is None:
            raise doc.error((*loc, "type"), 'required key is missing: "webhook" or "command"')
        if kind == "webhook":
            webhook = validate_table(
                doc,
                WebhookHookSettings,
                table,
                loc,
                given=given,
                other=("command", CommandHookSettings),
            )
            return self._webhook(doc, loc, webhook, secret_keys)
        if kind == "command":
            command = validate_table(
                doc,
                CommandHookSettings,
                table,
                loc,
                given=given,
                other=("webhook", WebhookHookSettings),
            )
            return self._command(doc, loc, command)
        got = "" if isinstance(kind, str) else f" (got {toml_type(kind)})"
        raise doc.error((*loc, "type"), f'must be "webhook" or "command"{got}')

    def _webhook(
        self, doc: Document, loc: KeyPath, hook: WebhookHookSettings, secret_keys: list[StatKey]
    ) -> WebhookHookSettings:
        """``hook`` with its secret read and decoded, and its secret file made absolute."""
        if hook.secret_file is not None and hook.secret_env is not None:
            raise doc.error((*loc, "secret_env"), "set secret_file or secret_env, not both")
        if hook.secret_file is not None:
            path = self._resolve(hook.secret_file)
            secret_keys.append(stat_key(path))
            secret = secret_from_file(doc, (*loc, "secret_file"), path)
            return hook.model_copy(update={"secret": secret, "secret_file": path})
        if hook.secret_env is not None:
            secret = secret_from_env(doc, (*loc, "secret_env"), self.env, hook.secret_env)
            return hook.model_copy(update={"secret": secret})
        return hook

    def _command(
        self, doc: Document, loc: KeyPath, hook: CommandHookSettings
    ) -> CommandHookSettings:
        """``hook`` with ``argv[0]`` made an absolute path to an executable file."""
        program = hook.argv[0]
        key_loc: KeyPath = (*loc, "argv", 0)
        if not program:
            raise doc.error(key_loc, "the command must not be empty")
        if "/" in program:
            path = self._resolve(program)
            try:
                info = path.stat()
            except OSError as exc:
                raise doc.error(key_loc, f"command {path}: {os_reason(exc)}") from None
            if not stat.S_ISREG(info.st_mode):
                raise doc.error(key_loc, f"command {path} is not a regular file")
            if not os.access(path, os.X_OK):
                raise doc.error(key_loc, f"command {path} is not executable")
        else:
            found = shutil.which(program, path=self.env.get("PATH", os.defpath))
            if found is None:
                raise doc.error(
                    key_loc,
                    f"command {program!r} not found on PATH (give an absolute path instead)",
                )
            path = Path(found).absolute()
        return hook.model_copy(update={"argv": (str(path), *hook.argv[1:])})

    def _daemon(
        self, doc: Document, daemon: DaemonSettings, hooks: Collection[str] | None
    ) -> DaemonSettings:
        """``daemon`` with its database URL and ``jobs_dir`` resolved, its hooks checked."""
        loc: KeyPath = ("daemon",)
        problems = Problems()
        database_url = problems.check(self._database_url, doc, daemon.database_url)
        problems.check(check_hook_names, doc, (*loc, "default_hooks"), daemon.default_hooks, hooks)
        if daemon.replicas and database_url is not None and database_url.startswith("sqlite"):
            problems.add(
                doc.error(
                    (*loc, "replicas"),
                    "needs a PostgreSQL database: several daemons cannot share a SQLite "
                    'file (set database = "postgresql://...", or replicas = false)',
                )
            )
        if daemon.replicas and (why := lease_problem(daemon.lease_s, daemon.poll_interval_s)):
            problems.add(doc.error((*loc, "lease_s"), why))
        problems.raise_all()
        jobs_dir = None if daemon.jobs_dir is None else self._resolve(daemon.jobs_dir)
        return daemon.model_copy(update={"database_url": database_url, "jobs_dir": jobs_dir})

    def _database_url(self, doc: Document, url: str) -> str:
        """The ``database`` URL resolved; a bad one is an error at ``daemon.database``."""
        try:
            return self._resolved_url(url)
        except ValueError as exc:
            message = str(exc)
        raise doc.error(("daemon", "database"), message)

    def _resolved_url(self, url: str) -> str:
        """sqlite URLs get an absolute path (driver left to the store); others pass as given."""
        match = _URL_SCHEME_RE.fullmatch(url)
        if match is None:
            raise ValueError(
                "must be a SQLAlchemy database URL, e.g. sqlite:///comfywatch.db "
                "or postgresql://user@host/db"
            )
        scheme = match["scheme"].lower()
        if scheme != "sqlite" and not scheme.startswith("sqlite+"):
            return url
        rest = match["rest"]
        if not rest:
            return "sqlite:///:memory:"
        if not rest.startswith("/"):
            raise ValueError(
                "sqlite URLs look like sqlite:///relative/path.db or sqlite:////absolute/path.db"
            )
        database, sep, query = rest[1:].partition("?")
        if database in ("", ":memory:") or "uri=true" in query.lower():
            return f"sqlite:///{database or ':memory:'}{sep}{query}"
        return f"sqlite:///{self._resolve(database)}{sep}{query}"
