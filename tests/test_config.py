"""Config loading: TOML files to frozen settings, and located errors for every mistake."""

from __future__ import annotations

import base64
import dataclasses
import os
import shutil
import textwrap
import traceback
from pathlib import Path

import pytest
from pydantic import ValidationError

from comfywatch.config import (
    DEFAULT_CONFIG_PATH,
    DEFAULT_RETRY_SCHEDULE_S,
    CommandHookSettings,
    Settings,
    WebhookHookSettings,
    config_fingerprint,
    default_config_path,
    load_settings,
    redact_url,
)
from comfywatch.errors import ConfigError
from comfywatch.spool.parse import MAX_SPOOL_BYTES, read_spool_file
from comfywatch.states import TERMINAL_STATES, JobState

REPO = Path(__file__).resolve().parent.parent
SECRET_KEY = b"0123456789abcdef0123456789abcdef"
WHSEC = "whsec_" + base64.b64encode(SECRET_KEY).decode()
HEADER_SECRET = "Bearer TOPSECRET-header-value"

SERVER = """
[servers.local]
url = "http://127.0.0.1:8188"
"""


def write(path: Path, text: str) -> Path:
    """Writes dedented ``text``; its first non-empty line is line 1."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


def make_executable(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\nexit 0\n", encoding="utf-8")
    path.chmod(0o755)
    return path


def load_error(path: Path, env: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_settings(path, env=env if env is not None else {})
    return info.value


def assert_located(error: ConfigError, file: Path, key: str | None, line: int | None) -> None:
    """The error names the file, key and line, both as attributes and in its text."""
    assert (error.file, error.key, error.line) == (str(file), key, line), str(error)
    text = str(error)
    assert str(file) in text
    if key is not None:
        assert key in text
    if line is not None:
        assert f"{file}:{line}:" in text


@pytest.fixture
def full_example(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """The documented example, with the secret file and command made real."""
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "notify.secret").write_text(WHSEC + "\n", encoding="utf-8")
    archive = make_executable(tmp_path / "bin" / "archive-outputs")
    config = write(
        tmp_path / "comfywatch.toml",
        f"""
        [daemon]
        database = "sqlite:///comfywatch.db"
        poll_interval_s = 1.0
        jobs_dir = "jobs.d"
        keep_registered_files = false
        not_found_after_s = 60
        default_hooks = ["notify"]
        http = "127.0.0.1:9464"
        retention_days = 30
        log_level = "info"
        log_format = "auto"
        max_history_fetches = 8
        hook_concurrency = 8

        [servers.local]
        url = "http://127.0.0.1:8188/"
        headers = {{ Authorization = "{HEADER_SECRET}" }}
        queue_timeout_s = 86400
        run_timeout_s = 3600
        request_timeout_s = 10
        max_response_bytes = 67108864
        max_history_fetches = 4
        queue_refresh_s = 120

        [servers.gpu-2]
        url = "https://gpu-2.internal:8443/comfy"

        [hooks.notify]
        type = "webhook"
        url = "https://example.com/comfy-events"
        secret_file = "secrets/notify.secret"
        on = ["success", "error"]
        timeout_s = 10
        headers = {{ "X-Team" = "render" }}
        retry_schedule_s = [5, 300, 1800, 7200, 18000, 36000, 36000]

        [hooks.archive]
        type = "command"
        argv = ["{archive}", "--dest", "/srv/renders"]
        on = ["success"]
        timeout_s = 120
        retry_schedule_s = [1, 2.5]
        max_output_bytes = 65536

        [[jobs]]
        server = "local"
        prompt_id = "35bd62e6-a6fd-4a32-84d4-365d80bd79d5"
        labels = {{ batch = "catalog-42" }}
        hooks = ["notify", "archive"]

        [[jobs]]
        server = "gpu-2"
        prompt_id = "35bd62e6-a6fd-4a32-84d4-365d80bd79d5"

        [[jobs]]
        server = "local"
        prompt_id = "no-hooks"
        hooks = []
        """,
    )
    write(
        tmp_path / "jobs.d" / "10-more.toml",
        """
        [[jobs]]
        server = "gpu-2"
        prompt_id = "from-drop-in"
        labels = { owner = "me" }
        """,
    )
    return config, {"PATH": "/usr/bin:/bin"}


# ----------------------------------------------------------------------- happy path


def test_full_example_loads(full_example: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    """Every documented key of the example is read, resolved and typed."""
    config, env = full_example
    settings = load_settings(config, env=env)

    assert settings.path == config
    daemon = settings.daemon
    assert daemon.database_url == f"sqlite:///{tmp_path}/comfywatch.db"
    assert daemon.database_url.startswith("sqlite:////")
    assert daemon.poll_interval_s == 1.0
    assert daemon.jobs_dir == tmp_path / "jobs.d"
    assert daemon.keep_registered_files is False
    assert daemon.not_found_after_s == 60
    assert daemon.default_hooks == ("notify",)
    assert (daemon.http_host, daemon.http_port) == ("127.0.0.1", 9464)
    assert daemon.retention_days == 30
    assert (daemon.log_level, daemon.log_format) == ("info", "auto")
    assert daemon.hook_concurrency == 8
    assert daemon.max_history_fetches == 8

    assert list(settings.servers) == ["local", "gpu-2"]
    local = settings.servers["local"]
    assert local.name == "local"
    assert local.url == "http://127.0.0.1:8188"  # trailing slash stripped
    assert dict(local.headers) == {"Authorization": HEADER_SECRET}
    assert (local.queue_timeout_s, local.run_timeout_s) == (86400, 3600)
    assert local.request_timeout_s == 10
    assert local.max_response_bytes == 64 * 1024 * 1024
    assert local.max_history_fetches == 4
    assert local.queue_refresh_s == 120
    gpu = settings.servers["gpu-2"]
    assert gpu.url == "https://gpu-2.internal:8443/comfy"
    assert dict(gpu.headers) == {}
    assert (gpu.queue_timeout_s, gpu.run_timeout_s) == (None, None)
    assert gpu.max_history_fetches == 8  # inherited from [daemon]
    assert gpu.queue_refresh_s == 300

    notify = settings.hooks["notify"]
    assert isinstance(notify, WebhookHookSettings)
    assert notify.type == "webhook"
    assert notify.url == "https://example.com/comfy-events"
    assert notify.secret == SECRET_KEY
    assert notify.secret_file == tmp_path / "secrets" / "notify.secret"
    assert notify.on == frozenset({JobState.SUCCESS, JobState.ERROR})
    assert notify.timeout_s == 10
    assert dict(notify.headers) == {"X-Team": "render"}
    assert notify.retry_schedule_s == DEFAULT_RETRY_SCHEDULE_S

    archive = settings.hooks["archive"]
    assert isinstance(archive, CommandHookSettings)
    assert archive.argv == (str(tmp_path / "bin" / "archive-outputs"), "--dest", "/srv/renders")
    assert archive.on == frozenset({JobState.SUCCESS})
    assert archive.timeout_s == 120
    assert archive.retry_schedule_s == (1.0, 2.5)
    assert archive.max_output_bytes == 65536

    jobs = {(job.server, job.prompt_id): job for job in settings.jobs}
    assert [(job.server, job.prompt_id) for job in settings.jobs] == [
        ("local", "35bd62e6-a6fd-4a32-84d4-365d80bd79d5"),
        ("gpu-2", "35bd62e6-a6fd-4a32-84d4-365d80bd79d5"),  # same id, other server: fine
        ("local", "no-hooks"),
    ]  # the spool file in jobs_dir is not read by a load
    first = jobs[("local", "35bd62e6-a6fd-4a32-84d4-365d80bd79d5")]
    assert first.hooks == ("notify", "archive")
    assert dict(first.labels) == {"batch": "catalog-42"}
    assert first.source == str(config)
    assert jobs[("gpu-2", "35bd62e6-a6fd-4a32-84d4-365d80bd79d5")].hooks == ("notify",)
    assert jobs[("local", "no-hooks")].hooks == ()
    spool_file = tmp_path / "jobs.d" / "10-more.toml"
    [spooled] = read_spool_file(spool_file, settings)  # as the daemon reads it
    assert (spooled.server, spooled.prompt_id) == ("gpu-2", "from-drop-in")
    assert spooled.source == str(spool_file)
    assert spooled.hooks == ("notify",)
    assert dict(spooled.labels) == {"owner": "me"}


def test_defaults(tmp_path: Path) -> None:
    """A file with one server gets every documented default."""
    config = write(tmp_path / "c.toml", SERVER)
    settings = load_settings(config, env={})
    daemon = settings.daemon
    assert daemon.database_url == f"sqlite:///{tmp_path}/comfywatch.db"
    assert daemon.poll_interval_s == 1.0
    assert daemon.jobs_dir is None
    assert daemon.keep_registered_files is True
    assert daemon.not_found_after_s == 60
    assert daemon.default_hooks == ()
    assert (daemon.http_host, daemon.http_port) == (None, None)
    assert daemon.retention_days is None
    assert (daemon.log_level, daemon.log_format) == ("info", "auto")
    assert (daemon.hook_concurrency, daemon.max_history_fetches) == (8, 8)
    server = settings.servers["local"]
    assert server.request_timeout_s == 10
    assert server.max_response_bytes == 64 * 1024 * 1024
    assert server.max_history_fetches == 8
    assert settings.hooks == {}
    assert settings.jobs == ()


def test_hook_defaults(tmp_path: Path) -> None:
    """Hooks fire on every terminal state, retry on the default schedule; timeouts by type."""
    make_executable(tmp_path / "run.sh")
    config = write(
        tmp_path / "c.toml",
        """
        [hooks.web]
        type = "webhook"
        url = "http://receiver.local/x?token=1"

        [hooks.cmd]
        type = "command"
        argv = ["./run.sh"]
        """,
    )
    hooks = load_settings(config, env={}).hooks
    web, cmd = hooks["web"], hooks["cmd"]
    assert isinstance(web, WebhookHookSettings)
    assert isinstance(cmd, CommandHookSettings)
    assert web.on == cmd.on == TERMINAL_STATES
    assert web.retry_schedule_s == cmd.retry_schedule_s == DEFAULT_RETRY_SCHEDULE_S
    assert (web.timeout_s, cmd.timeout_s) == (10, 60)
    assert web.secret is None  # unsigned webhooks are allowed
    assert cmd.max_output_bytes == 64 * 1024
    assert cmd.argv == (str(tmp_path / "run.sh"),)


def test_settings_are_immutable(full_example: tuple[Path, dict[str, str]]) -> None:
    config, env = full_example
    settings = load_settings(config, env=env)
    with pytest.raises(ValidationError, match="frozen"):
        settings.daemon.poll_interval_s = 5  # type: ignore[misc]
    with pytest.raises(TypeError):
        settings.servers["x"] = settings.servers["local"]  # type: ignore[index]
    with pytest.raises(TypeError):
        settings.jobs[0].labels["x"] = "y"  # type: ignore[index]
    with pytest.raises(TypeError):
        settings.servers["local"].headers["x"] = "y"  # type: ignore[index]


def test_loading_twice_gives_equal_settings(full_example: tuple[Path, dict[str, str]]) -> None:
    config, env = full_example
    assert load_settings(config, env=env) == load_settings(str(config), env=env)


def test_relative_paths_resolve_against_config_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The database, jobs_dir, secret_file and commands ignore the working directory."""
    folder = tmp_path / "etc" / "cw"
    (folder / "keys").mkdir(parents=True)
    (folder / "keys" / "hook.secret").write_text(WHSEC, encoding="utf-8")
    make_executable(folder / "hooks" / "run")
    write(folder / "drop" / "a.toml", '[[jobs]]\nserver = "local"\nprompt_id = "p"\n')
    write(
        folder / "comfywatch.toml",
        f"""
        [daemon]
        database = "sqlite+aiosqlite:///data/cw.db"
        jobs_dir = "drop"
        {SERVER}
        [hooks.web]
        type = "webhook"
        url = "https://example.com/"
        secret_file = "keys/hook.secret"

        [hooks.cmd]
        type = "command"
        argv = ["hooks/run", "x"]
        """,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    settings = load_settings(Path("../etc/cw/comfywatch.toml"), env={})
    assert settings.path.is_absolute()
    assert settings.daemon.database_url == f"sqlite:///{settings.path.parent}/data/cw.db"
    assert settings.daemon.jobs_dir == settings.path.parent / "drop"
    [job] = read_spool_file(settings.path.parent / "drop" / "a.toml", settings)
    assert job.source == str(settings.path.parent / "drop" / "a.toml")
    web = settings.hooks["web"]
    assert isinstance(web, WebhookHookSettings)
    assert web.secret == SECRET_KEY
    cmd = settings.hooks["cmd"]
    assert isinstance(cmd, CommandHookSettings)
    assert Path(cmd.argv[0]).is_absolute()
    assert Path(cmd.argv[0]).samefile(folder / "hooks" / "run")


@pytest.mark.parametrize(
    ("database", "expected"),
    [
        ("sqlite:///rel.db", "sqlite:///{dir}/rel.db"),
        ("sqlite:///sub/rel.db?timeout=5", "sqlite:///{dir}/sub/rel.db?timeout=5"),
        ("sqlite:////abs/path.db", "sqlite:////abs/path.db"),
        ("sqlite+aiosqlite:////abs/path.db", "sqlite:////abs/path.db"),
        ("sqlite+aiosqlite:///rel.db", "sqlite:///{dir}/rel.db"),
        ("sqlite://", "sqlite:///:memory:"),
        ("sqlite:///:memory:", "sqlite:///:memory:"),
        ("postgresql+asyncpg://cw:pw@db/cw", "postgresql+asyncpg://cw:pw@db/cw"),
        ("postgresql://db.internal/comfywatch", "postgresql://db.internal/comfywatch"),
    ],
)
def test_database_url_normalised(tmp_path: Path, database: str, expected: str) -> None:
    config = write(tmp_path / "c.toml", f'[daemon]\ndatabase = "{database}"\n')
    url = load_settings(config, env={}).daemon.database_url
    assert url == expected.format(dir=tmp_path)


@pytest.mark.parametrize(
    ("http", "host", "port"),
    [
        ("127.0.0.1:9464", "127.0.0.1", 9464),
        ("0.0.0.0:80", "0.0.0.0", 80),
        ("localhost:9464", "localhost", 9464),
        ("[::1]:9464", "::1", 9464),
        ("[::]:0", "::", 0),
    ],
)
def test_http_listener(tmp_path: Path, http: str, host: str, port: int) -> None:
    config = write(tmp_path / "c.toml", f'[daemon]\nhttp = "{http}"\n')
    daemon = load_settings(config, env={}).daemon
    assert (daemon.http_host, daemon.http_port) == (host, port)


def test_bare_command_is_found_on_path(tmp_path: Path) -> None:
    make_executable(tmp_path / "bin" / "notify-me")
    config = write(
        tmp_path / "c.toml",
        '[hooks.cmd]\ntype = "command"\nargv = ["notify-me", "--flag"]\n',
    )
    hook = load_settings(config, env={"PATH": f"/nonexistent:{tmp_path / 'bin'}"}).hooks["cmd"]
    assert isinstance(hook, CommandHookSettings)
    assert hook.argv == (str(tmp_path / "bin" / "notify-me"), "--flag")


def test_secret_from_env(tmp_path: Path) -> None:
    config = write(
        tmp_path / "c.toml",
        '[hooks.w]\ntype = "webhook"\nurl = "https://e.com"\nsecret_env = "HOOK_SECRET"\n',
    )
    hook = load_settings(config, env={"HOOK_SECRET": WHSEC}).hooks["w"]
    assert isinstance(hook, WebhookHookSettings)
    assert hook.secret == SECRET_KEY
    assert hook.secret_env == "HOOK_SECRET"


def test_jobs_dir_missing_is_not_an_error(tmp_path: Path) -> None:
    config = write(tmp_path / "c.toml", '[daemon]\njobs_dir = "nope.d"\n' + SERVER)
    settings = load_settings(config, env={})
    assert settings.daemon.jobs_dir == tmp_path / "nope.d"
    assert settings.jobs == ()


def test_nothing_in_jobs_dir_is_read_by_a_load(tmp_path: Path) -> None:
    """The spool is the daemon's to ingest: broken files there, or a jobs_dir that is not
    even a directory, do not stop a load (nor, so, a query command)."""
    config = write(tmp_path / "c.toml", '[daemon]\njobs_dir = "jobs.d"\n' + SERVER)
    write(tmp_path / "jobs.d" / "a.toml", '[[jobs]]\nserver = "local"\nprompt_id = "a"\n')
    write(tmp_path / "jobs.d" / "broken.toml", "this is not toml [")
    write(tmp_path / "jobs.d" / "elsewhere.toml", '[[jobs]]\nserver = "nowhere"\n')
    assert load_settings(config, env={}).jobs == ()
    shutil.rmtree(tmp_path / "jobs.d")
    (tmp_path / "jobs.d").write_text("", encoding="utf-8")
    assert load_settings(config, env={}).daemon.jobs_dir == tmp_path / "jobs.d"


def test_jobs_as_inline_array(tmp_path: Path) -> None:
    config = write(
        tmp_path / "c.toml",
        SERVER + 'jobs = [{ server = "local", prompt_id = "a" }, { server = "local", '
        'prompt_id = "b" }]\n',
    )
    config.write_text(
        'jobs = [\n  { server = "local", prompt_id = "a" },\n  { server = "local", '
        'prompt_id = "b" },\n]\n' + textwrap.dedent(SERVER),
        encoding="utf-8",
    )
    assert [job.prompt_id for job in load_settings(config, env={}).jobs] == ["a", "b"]


# ----------------------------------------------------------------------- mistakes

MISTAKES = [
    pytest.param(
        """
        [daemon]
        poll_interval_s = = 1
        """,
        None,
        2,
        "syntax error",
        id="syntax-error",
    ),
    pytest.param(
        """
        # comment

        [deamon]
        poll_interval_s = 1
        """,
        "deamon",
        3,
        "unknown key (did you mean 'daemon'?)",
        id="unknown-top-level",
    ),
    pytest.param(
        """
        [daemon]
        pol_interval_s = 1
        """,
        "daemon.pol_interval_s",
        2,
        "did you mean 'poll_interval_s'?",
        id="unknown-daemon-key",
    ),
    pytest.param(
        """
        [servers.local]
        url = "http://x"
        reqest_timeout_s = 5
        """,
        "servers.local.reqest_timeout_s",
        3,
        "unknown key (did you mean 'request_timeout_s'?)",
        id="unknown-server-key",
    ),
    pytest.param(
        """
        [servers.local]
        url = "http://x"

        [[jobs]]
        server = "local"
        prompt_id = "a"

        [[jobs]]
        server = "local"
        promt_id = "b"
        """,
        "jobs[1].promt_id",
        10,
        "did you mean 'prompt_id'?",
        id="unknown-job-key-beats-missing",
    ),
    pytest.param(
        """
        [hooks.w]
        type = "webhook"
        url = "https://e.com"
        argv = ["x"]
        """,
        "hooks.w.argv",
        4,
        "'argv' belongs to command hooks",
        id="command-key-in-webhook",
    ),
    pytest.param(
        """
        [daemon]
        poll_interval_s = "1"
        """,
        "daemon.poll_interval_s",
        2,
        "must be a valid number (got string)",
        id="wrong-type-string-for-number",
    ),
    pytest.param(
        """
        [daemon]
        hook_concurrency = true
        """,
        "daemon.hook_concurrency",
        2,
        "(got boolean)",
        id="wrong-type-bool-for-int",
    ),
    pytest.param(
        """
        [daemon]
        max_history_fetches = 2.5
        """,
        "daemon.max_history_fetches",
        2,
        "valid integer",
        id="wrong-type-float-for-int",
    ),
    pytest.param(
        """
        [daemon]
        log_level = "verbose"
        """,
        "daemon.log_level",
        2,
        "'debug', 'info', 'warning' or 'error'",
        id="bad-log-level",
    ),
    pytest.param(
        """
        [daemon]
        log_format = 1
        """,
        "daemon.log_format",
        2,
        "(got integer)",
        id="log-format-wrong-type",
    ),
    pytest.param(
        """
        [daemon]
        database = "sqlite:///x.db"
        poll_interval_s = -1
        """,
        "daemon.poll_interval_s",
        3,
        "greater than 0",
        id="negative-interval",
    ),
    pytest.param(
        """
        [servers.a]
        url = "http://a"
        queue_refresh_s = 0
        """,
        "servers.a.queue_refresh_s",
        3,
        "greater than 0",
        id="zero-queue-refresh",
    ),
    pytest.param(
        """
        [servers.a]
        url = "http://a"
        queue_refresh_s = "5m"
        """,
        "servers.a.queue_refresh_s",
        3,
        "must be a valid number (got string)",
        id="queue-refresh-not-a-number",
    ),
    pytest.param(
        """
        [daemon]
        poll_interval_s = nan
        """,
        "daemon.poll_interval_s",
        2,
        "finite",
        id="nan-interval",
    ),
    pytest.param(
        """
        [daemon]
        not_found_after_s = -0.5
        """,
        "daemon.not_found_after_s",
        2,
        "greater than or equal to 0",
        id="negative-grace",
    ),
    pytest.param(
        """
        [daemon]
        max_history_fetches = 257
        """,
        "daemon.max_history_fetches",
        2,
        "less than or equal to 256",
        id="history-fetches-too-high",
    ),
    pytest.param(
        """
        [daemon]
        hook_concurrency = 0
        """,
        "daemon.hook_concurrency",
        2,
        "greater than or equal to 1",
        id="hook-concurrency-zero",
    ),
    pytest.param(
        """
        [daemon]
        retention_days = 0
        """,
        "daemon.retention_days",
        2,
        "greater than 0",
        id="retention-zero",
    ),
    pytest.param(
        """
        [daemon]
        http = "9464"
        """,
        "daemon.http",
        2,
        "host:port",
        id="http-no-host",
    ),
    pytest.param(
        """
        [daemon]
        http = "::1:9464"
        """,
        "daemon.http",
        2,
        "[::1]:9464",
        id="http-unbracketed-ipv6",
    ),
    pytest.param(
        """
        [daemon]
        http = "127.0.0.1:70000"
        """,
        "daemon.http",
        2,
        "between 0 and 65535",
        id="http-port-range",
    ),
    pytest.param(
        """
        [daemon]
        database = "comfywatch.db"
        """,
        "daemon.database",
        2,
        "SQLAlchemy database URL",
        id="database-not-a-url",
    ),
    pytest.param(
        """
        [daemon]
        database = "sqlite://host/x.db"
        """,
        "daemon.database",
        2,
        "sqlite:////absolute",
        id="database-sqlite-with-host",
    ),
    pytest.param(
        """
        [daemon]
        default_hooks = ["notfy"]

        [hooks.notify]
        type = "webhook"
        url = "https://e.com"
        """,
        "daemon.default_hooks[0]",
        2,
        "unknown hook 'notfy' (did you mean 'notify'?)",
        id="unknown-default-hook",
    ),
    pytest.param(
        """
        [servers.local]
        headers = { A = "b" }
        """,
        "servers.local.url",
        1,
        "required key is missing",
        id="server-url-missing",
    ),
    pytest.param(
        """
        [servers.local]
        url = "ftp://host/x"
        """,
        "servers.local.url",
        2,
        "http:// or https://",
        id="server-url-scheme",
    ),
    pytest.param(
        """
        [servers.local]
        url = "http:///path"
        """,
        "servers.local.url",
        2,
        "must name a host",
        id="server-url-no-host",
    ),
    pytest.param(
        """
        [servers.local]
        url = "http://user:pw@host"
        """,
        "servers.local.url",
        2,
        "credentials",
        id="server-url-credentials",
    ),
    pytest.param(
        """
        [servers.local]
        url = "http://host:99999"
        """,
        "servers.local.url",
        2,
        "not a valid URL",
        id="server-url-bad-port",
    ),
    pytest.param(
        """
        [servers."a b"]
        url = "http://host"
        """,
        'servers."a b"',
        1,
        "letters, digits",
        id="server-bad-name",
    ),
    pytest.param(
        """
        [servers]
        local = "http://host"
        """,
        "servers.local",
        2,
        "must be a table (got string)",
        id="server-not-a-table",
    ),
    pytest.param(
        """
        [servers.local]
        url = "http://host"
        headers = { Authorization = 5 }
        """,
        "servers.local.headers.Authorization",
        3,
        "valid string (got integer)",
        id="header-value-type",
    ),
    pytest.param(
        """
        [servers.local]
        url = "http://host"
        headers = { "Bad Name" = "x" }
        """,
        'servers.local.headers."Bad Name"',
        3,
        "not a valid HTTP header name",
        id="header-name",
    ),
    pytest.param(
        """
        [servers.local]
        url = "http://host"
        queue_timeout_s = 0
        """,
        "servers.local.queue_timeout_s",
        3,
        "greater than 0",
        id="queue-timeout-zero",
    ),
    pytest.param(
        """
        [hooks.w]
        url = "https://e.com"
        """,
        "hooks.w.type",
        1,
        'required key is missing: "webhook" or "command"',
        id="hook-type-missing",
    ),
    pytest.param(
        """
        [hooks.w]
        type = "email"
        """,
        "hooks.w.type",
        2,
        'must be "webhook" or "command"',
        id="hook-type-unknown",
    ),
    pytest.param(
        """
        [hooks.w]
        type = "webhook"
        url = "https://e.com"
        on = ["success", "eror"]
        """,
        "hooks.w.on[1]",
        4,
        "'eror' is not a terminal state (did you mean 'error'?)",
        id="hook-on-typo",
    ),
    pytest.param(
        """
        [hooks.w]
        type = "webhook"
        url = "https://e.com"
        on = ["running"]
        """,
        "hooks.w.on[0]",
        4,
        "not a terminal state",
        id="hook-on-non-terminal",
    ),
    pytest.param(
        """
        [hooks.w]
        type = "webhook"
        url = "https://e.com"
        on = []
        """,
        "hooks.w.on",
        4,
        "must not be empty",
        id="hook-on-empty",
    ),
    pytest.param(
        """
        [hooks.w]
        type = "webhook"
        url = "https://e.com"
        retry_schedule_s = [
            5,
            -1,
        ]
        """,
        "hooks.w.retry_schedule_s[1]",
        6,
        "greater than or equal to 0",
        id="retry-negative-multiline",
    ),
    pytest.param(
        """
        [hooks.w]
        type = "webhook"
        url = "https://e.com"
        secret_file = "a"
        secret_env = "B"
        """,
        "hooks.w.secret_env",
        5,
        "not both",
        id="secret-file-and-env",
    ),
    pytest.param(
        """
        [hooks.w]
        type = "webhook"
        url = "https://e.com"
        secret_env = "NOT A NAME"
        """,
        "hooks.w.secret_env",
        4,
        "environment variable name",
        id="secret-env-bad-name",
    ),
    pytest.param(
        """
        [hooks.c]
        type = "command"
        argv = []
        """,
        "hooks.c.argv",
        3,
        "must not be empty",
        id="argv-empty",
    ),
    pytest.param(
        """
        [hooks.c]
        type = "command"
        argv = ["/bin/true", 5]
        """,
        "hooks.c.argv[1]",
        3,
        "(got integer)",
        id="argv-not-strings",
    ),
    pytest.param(
        """
        [[jobs]]
        server = "local"
        prompt_id = "a"
        """,
        "jobs[0].server",
        2,
        "unknown server 'local'",
        id="no-servers-at-all",
    ),
    pytest.param(
        """
        [servers.local]
        url = "http://x"

        [[jobs]]
        server = "local"
        prompt_id = "a"

        [[jobs]]
        server = "locl"
        prompt_id = "b"
        """,
        "jobs[1].server",
        9,
        "unknown server 'locl' (did you mean 'local'?)",
        id="missing-server",
    ),
    pytest.param(
        """
        [servers.local]
        url = "http://x"

        [hooks.notify]
        type = "webhook"
        url = "https://e.com"

        [[jobs]]
        server = "local"
        prompt_id = "a"
        hooks = ["notify", "archive"]
        """,
        "jobs[0].hooks[1]",
        11,
        "unknown hook 'archive'",
        id="unknown-hook",
    ),
    pytest.param(
        """
        [servers.local]
        url = "http://x"

        [hooks.notify]
        type = "webhook"
        url = "https://e.com"

        [[jobs]]
        server = "local"
        prompt_id = "a"
        hooks = ["notify", "notify"]
        """,
        "jobs[0].hooks[1]",
        11,
        "listed twice",
        id="hook-listed-twice",
    ),
    pytest.param(
        """
        [servers.local]
        url = "http://x"

        [[jobs]]
        server = "local"
        prompt_id = "a"

        [[jobs]]
        server = "local"
        prompt_id = "a"
        """,
        "jobs[1].prompt_id",
        10,
        "duplicate job",
        id="duplicate-in-one-file",
    ),
    pytest.param(
        """
        [servers.local]
        url = "http://x"

        [[jobs]]
        server = "local"
        prompt_id = ""
        """,
        "jobs[0].prompt_id",
        6,
        "at least 1 character",
        id="prompt-id-empty",
    ),
    pytest.param(
        """
        [servers.local]
        url = "http://x"

        [[jobs]]
        server = "local"
        prompt_id = "a\\tb"
        """,
        "jobs[0].prompt_id",
        6,
        "control characters",
        id="prompt-id-control-char",
    ),
    pytest.param(
        f"""
        [servers.local]
        url = "http://x"

        [[jobs]]
        server = "local"
        prompt_id = "{"x" * 256}"
        """,
        "jobs[0].prompt_id",
        6,
        "at most 255 characters",
        id="prompt-id-too-long",
    ),
    pytest.param(
        """
        [servers.local]
        url = "http://x"

        [[jobs]]
        server = "local"
        prompt_id = "a"
        labels = { batch = 42 }
        """,
        "jobs[0].labels.batch",
        7,
        "(got integer)",
        id="label-not-string",
    ),
    pytest.param(
        """
        [servers.local]
        url = "http://x"

        [jobs]
        server = "local"
        """,
        "jobs",
        4,
        "[[jobs]]",
        id="jobs-not-an-array",
    ),
    pytest.param(
        """
        [daemon]
        jobs_dir = "a\\u0000b"
        """,
        "daemon.jobs_dir",
        2,
        "NUL",
        id="path-with-nul",
    ),
    # Attributes the loader fills in are not keys a file may set.
    pytest.param(
        """
        [servers.local]
        url = "http://x"
        name = "other"
        """,
        "servers.local.name",
        3,
        "unknown key",
        id="server-name-is-not-a-key",
    ),
    pytest.param(
        """
        [hooks.w]
        type = "webhook"
        url = "https://e.com"
        secret = "whsec_AAAA"
        timeout_s = 0
        """,
        "hooks.w.secret",
        4,
        "unknown key (did you mean 'secret_env'?)",
        id="webhook-secret-is-not-a-key",
    ),
    pytest.param(
        """
        [servers.local]
        url = "http://x"

        [[jobs]]
        server = "local"
        prompt_id = "a"
        source = "elsewhere.toml"
        """,
        "jobs[0].source",
        7,
        "unknown key",
        id="job-source-is-not-a-key",
    ),
    pytest.param(
        """
        [daemon]
        database_url = "sqlite:///x.db"
        """,
        "daemon.database_url",
        2,
        "unknown key (did you mean 'database'?)",
        id="database-url-is-not-a-key",
    ),
]


@pytest.mark.parametrize(("text", "key", "line", "fragment"), MISTAKES)
def test_mistake_is_located(
    tmp_path: Path, text: str, key: str | None, line: int, fragment: str
) -> None:
    """Each mistake names the file, the dotted key and the line."""
    config = write(tmp_path / "comfywatch.toml", text)
    error = load_error(config)
    assert_located(error, config, key, line)
    assert fragment in error.message


def test_syntax_error_message_is_clean(tmp_path: Path) -> None:
    config = write(tmp_path / "c.toml", "[daemon]\npoll_interval_s = = 1\n")
    error = load_error(config)
    assert "(at line" not in str(error)
    assert "column" in str(error)


def test_syntax_error_at_end_of_file(tmp_path: Path) -> None:
    config = write(tmp_path / "c.toml", "[daemon]\ndefault_hooks = [\n")
    assert_located(load_error(config), config, None, 2)


@pytest.mark.parametrize("kind", ["missing", "directory", "not-utf8"])
def test_unreadable_main_file(tmp_path: Path, kind: str) -> None:
    config = tmp_path / "c.toml"
    if kind == "directory":
        config.mkdir()
    elif kind == "not-utf8":
        config.write_bytes(b'[daemon]\nlog_level = "\xff"\n')
    error = load_error(config)
    assert error.file == str(config)
    assert str(config) in str(error)
    if kind == "not-utf8":
        assert error.line == 2
        assert "UTF-8" in error.message


def test_every_mistake_is_reported_in_one_load(tmp_path: Path) -> None:
    """A load reports all its mistakes, in file order, each with file, line and key (a
    misspelt key before the missing one it stands for)."""
    config = write(
        tmp_path / "comfywatch.toml",
        """
        [daemon]
        database = "comfywatch.db"
        default_hooks = ["nope"]

        [servers.local]
        url = "http://x"
        reqest_timeout_s = 5
        queue_timeout_s = -1

        [servers."bad name"]
        url = "http://y"

        [hooks.w]
        type = "webhook"
        url = "https://e.com"
        argv = ["x"]

        [[jobs]]
        server = "elsewhere"
        prompt_id = "a"

        [[jobs]]
        server = "local"
        promt_id = "b"

        [[jobs]]
        server = "local"
        prompt_id = "c"
        hooks = ["w", "v"]

        [[jobs]]
        server = "local"
        prompt_id = "d"

        [[jobs]]
        server = "local"
        prompt_id = "d"

        [deamon]
        poll_interval_s = 1
        """,
    )
    error = load_error(config)
    found = [(problem.line, problem.key) for problem in error.problems]
    assert found == [
        (2, "daemon.database"),
        (3, "daemon.default_hooks[0]"),
        (7, "servers.local.reqest_timeout_s"),
        (8, "servers.local.queue_timeout_s"),
        (10, 'servers."bad name"'),
        (16, "hooks.w.argv"),
        (19, "jobs[0].server"),
        (24, "jobs[1].promt_id"),
        (22, "jobs[1].prompt_id"),
        (29, "jobs[2].hooks[1]"),
        (37, "jobs[4].prompt_id"),
        (39, "deamon"),
    ], str(error)
    assert_located(error, config, "daemon.database", 2)  # the first one's place
    lines = str(error).splitlines()
    assert len(lines) == len(found)
    for line, (number, key) in zip(lines, found, strict=True):
        assert line.startswith(f"{config}:{number}: {key}: "), line
    assert "did you mean 'prompt_id'?" in lines[7] and "required key is missing" in lines[8]
    assert "already registered at" in lines[10] and "jobs[3]" in lines[10]


def test_checks_that_need_a_valid_table_wait_for_it(tmp_path: Path) -> None:
    """What the loader checks beyond a table's own rules (here: that default_hooks names
    hooks) is checked once the table itself is right."""
    config = write(
        tmp_path / "comfywatch.toml",
        """
        [daemon]
        pol_interval_s = 1
        log_level = "verbose"
        default_hooks = ["nope"]
        """,
    )
    error = load_error(config)
    assert [(p.line, p.key) for p in error.problems] == [
        (2, "daemon.pol_interval_s"),
        (3, "daemon.log_level"),
    ], str(error)


def test_a_broken_table_is_one_mistake_not_one_per_use(tmp_path: Path) -> None:
    """A server or hook whose table is wrong is still a name that exists: the jobs and the
    daemon that name it are not wrong too."""
    config = write(
        tmp_path / "comfywatch.toml",
        """
        [daemon]
        default_hooks = ["w"]

        [servers.local]
        urll = "http://x"

        [hooks.w]
        type = "webhook"

        [[jobs]]
        server = "local"
        prompt_id = "a"
        hooks = ["w"]
        """,
    )
    error = load_error(config)
    assert [(p.line, p.key) for p in error.problems] == [
        (5, "servers.local.urll"),
        (4, "servers.local.url"),
        (7, "hooks.w.url"),
    ], str(error)


def test_a_table_of_the_wrong_kind_hides_no_other_mistake(tmp_path: Path) -> None:
    config = write(
        tmp_path / "comfywatch.toml",
        """
        servers = 1
        hooks = "x"

        [daemon]
        poll_interval_s = -1

        [[jobs]]
        server = "anything"
        prompt_id = "a"
        hooks = ["anything"]
        """,
    )
    error = load_error(config)
    assert [(p.line, p.key) for p in error.problems] == [
        (1, "servers"),
        (2, "hooks"),
        (5, "daemon.poll_interval_s"),
    ], str(error)


# ---------------------------------------------------------------------- spool files


def spool_config(tmp_path: Path) -> Path:
    return write(
        tmp_path / "comfywatch.toml",
        """
        [daemon]
        jobs_dir = "jobs.d"

        [servers.local]
        url = "http://x"

        [[jobs]]
        server = "local"
        prompt_id = "shared-id"
        """,
    )


def spool_error(config: Path, spool_file: Path) -> ConfigError:
    """The error the daemon would set ``spool_file`` aside with."""
    with pytest.raises(ConfigError) as info:
        read_spool_file(spool_file, load_settings(config, env={}))
    return info.value


def test_same_job_in_the_main_file_and_in_spool_files_is_no_error(tmp_path: Path) -> None:
    """A job named again (by the main file or by another spool file) is a re-registration."""
    config = spool_config(tmp_path)
    settings = load_settings(config, env={})
    for name in ("a.toml", "b.toml"):
        path = write(
            tmp_path / "jobs.d" / name, '[[jobs]]\nserver = "local"\nprompt_id = "shared-id"\n'
        )
        [job] = read_spool_file(path, settings)
        assert (job.prompt_id, job.source) == ("shared-id", str(path))


def test_duplicate_within_one_spool_file_names_both_places(tmp_path: Path) -> None:
    config = spool_config(tmp_path)
    spool_file = write(
        tmp_path / "jobs.d" / "20-batch.toml",
        """
        [[jobs]]
        server = "local"
        prompt_id = "twice"

        [[jobs]]
        server = "local"
        prompt_id = "twice"
        """,
    )
    error = spool_error(config, spool_file)
    assert_located(error, spool_file, "jobs[1].prompt_id", 7)
    assert f"{spool_file}:3" in error.message  # the first place
    assert "jobs[0]" in error.message


def test_every_mistake_of_a_spool_file_is_reported(tmp_path: Path) -> None:
    config = spool_config(tmp_path)
    spool_file = write(
        tmp_path / "jobs.d" / "a.toml",
        """
        [[jobs]]
        server = "elsewhere"
        prompt_id = "a"

        [[jobs]]
        server = "local"
        prompt_id = "b"
        hooks = ["none"]

        [servers.other]
        url = "http://y"
        """,
    )
    error = spool_error(config, spool_file)
    assert [(p.file, p.line, p.key) for p in error.problems] == [
        (str(spool_file), 2, "jobs[0].server"),
        (str(spool_file), 8, "jobs[1].hooks[0]"),
        (str(spool_file), 10, "servers"),
    ], str(error)


def test_spool_file_may_hold_only_jobs(tmp_path: Path) -> None:
    config = spool_config(tmp_path)
    spool_file = write(
        tmp_path / "jobs.d" / "a.toml",
        """
        [[jobs]]
        server = "local"
        prompt_id = "a"

        [servers.other]
        url = "http://y"
        """,
    )
    error = spool_error(config, spool_file)
    assert_located(error, spool_file, "servers", 5)
    assert "only hold [[jobs]]" in error.message


def test_spool_file_job_errors_name_the_spool_file(tmp_path: Path) -> None:
    config = spool_config(tmp_path)
    spool_file = write(
        tmp_path / "jobs.d" / "a.toml",
        """
        [[jobs]]
        server = "local"
        prompt_id = "a"

        [[jobs]]
        server = "remote"
        prompt_id = "b"
        """,
    )
    error = spool_error(config, spool_file)
    assert_located(error, spool_file, "jobs[1].server", 6)
    assert "unknown server 'remote'" in error.message


def test_spool_file_syntax_error(tmp_path: Path) -> None:
    config = spool_config(tmp_path)
    spool_file = write(tmp_path / "jobs.d" / "a.toml", '[[jobs]]\nserver = "local\n')
    assert_located(spool_error(config, spool_file), spool_file, None, 2)


def test_spool_file_that_is_a_directory(tmp_path: Path) -> None:
    """Tests run as root, so chmod 000 would not stop a read: use a directory instead."""
    config = spool_config(tmp_path)
    (tmp_path / "jobs.d" / "x.toml").mkdir(parents=True)
    error = spool_error(config, tmp_path / "jobs.d" / "x.toml")
    assert error.file == str(tmp_path / "jobs.d" / "x.toml")
    assert "directory" in error.message


def test_spool_file_not_utf8(tmp_path: Path) -> None:
    config = spool_config(tmp_path)
    spool_file = tmp_path / "jobs.d" / "x.toml"
    spool_file.parent.mkdir()
    spool_file.write_bytes(b'[[jobs]]\nserver = "local"\nprompt_id = "\xc3\x28"\n')
    error = spool_error(config, spool_file)
    assert_located(error, spool_file, None, 3)
    assert "UTF-8" in error.message


@pytest.mark.parametrize("target", ["gone.toml", "real.toml"])
def test_spool_file_that_is_a_symbolic_link(tmp_path: Path, target: str) -> None:
    """Not followed, dangling or not: a spool file is a file of its own."""
    config = spool_config(tmp_path)
    write(tmp_path / "real.toml", '[[jobs]]\nserver = "local"\nprompt_id = "a"\n')
    (tmp_path / "jobs.d").mkdir()
    (tmp_path / "jobs.d" / "x.toml").symlink_to(tmp_path / target)
    error = spool_error(config, tmp_path / "jobs.d" / "x.toml")
    assert error.file == str(tmp_path / "jobs.d" / "x.toml")
    assert "is a symbolic link" in error.message


def test_spool_file_that_is_a_named_pipe_is_not_waited_on(tmp_path: Path) -> None:
    config = spool_config(tmp_path)
    (tmp_path / "jobs.d").mkdir()
    os.mkfifo(tmp_path / "jobs.d" / "x.toml")
    error = spool_error(config, tmp_path / "jobs.d" / "x.toml")
    assert "is not a regular file" in error.message


def test_spool_file_too_large(tmp_path: Path) -> None:
    config = spool_config(tmp_path)
    big = write(tmp_path / "jobs.d" / "x.toml", "# padding\n")
    with big.open("ab") as out:
        out.truncate(MAX_SPOOL_BYTES + 1)
    error = spool_error(config, big)
    assert "larger than 16 MiB" in error.message


# ---------------------------------------------------------------- secrets, commands


def webhook_config(tmp_path: Path, secret_line: str) -> Path:
    return write(
        tmp_path / "c.toml",
        f"""
        [hooks.notify]
        type = "webhook"
        url = "https://example.com/comfy-events"
        {secret_line}
        """,
    )


def test_secret_file_missing(tmp_path: Path) -> None:
    config = webhook_config(tmp_path, 'secret_file = "notify.secret"')
    error = load_error(config)
    assert_located(error, config, "hooks.notify.secret_file", 4)
    assert str(tmp_path / "notify.secret") in error.message
    assert "does not exist" in error.message


def test_secret_file_is_a_directory(tmp_path: Path) -> None:
    (tmp_path / "notify.secret").mkdir()
    config = webhook_config(tmp_path, 'secret_file = "notify.secret"')
    assert_located(load_error(config), config, "hooks.notify.secret_file", 4)


def test_secret_env_unset(tmp_path: Path) -> None:
    config = webhook_config(tmp_path, 'secret_env = "NOTIFY_SECRET"')
    error = load_error(config, env={"OTHER": WHSEC})
    assert_located(error, config, "hooks.notify.secret_env", 4)
    assert "NOTIFY_SECRET is not set" in error.message


@pytest.mark.parametrize(
    ("secret", "fragment"),
    [
        ("notwhsec-TOPSECRETVALUE", "whsec_"),
        ("whsec_TOPSECRET!!!VALUE", "base64"),
        ("whsec_", "empty"),
        ("", "whsec_"),
        ("whsec_TOPSECRETVALUE\u00e9", "base64"),
    ],
    ids=["no-prefix", "bad-base64", "empty-key", "empty", "non-ascii"],
)
def test_bad_whsec(tmp_path: Path, secret: str, fragment: str) -> None:
    (tmp_path / "notify.secret").write_text(secret, encoding="utf-8")
    config = webhook_config(tmp_path, 'secret_file = "notify.secret"')
    error = load_error(config)
    assert_located(error, config, "hooks.notify.secret_file", 4)
    assert fragment in error.message
    assert "TOPSECRET" not in str(error)

    env_config = webhook_config(tmp_path, 'secret_env = "S"')
    error = load_error(env_config, env={"S": secret})
    assert_located(error, env_config, "hooks.notify.secret_env", 4)
    assert "TOPSECRET" not in str(error)


def test_whsec_without_padding_is_accepted(tmp_path: Path) -> None:
    config = webhook_config(tmp_path, 'secret_env = "S"')
    unpadded = "whsec_" + base64.b64encode(b"abcd").decode().rstrip("=")
    hook = load_settings(config, env={"S": unpadded}).hooks["notify"]
    assert isinstance(hook, WebhookHookSettings)
    assert hook.secret == b"abcd"


@pytest.mark.parametrize(
    ("argv0", "fragment"),
    [
        ("no-such-command-xyz", "not found on PATH"),
        ("/no/such/command", "does not exist"),
        ("bin/missing", "does not exist"),
        ("./bin", "not a regular file"),
        ("/", "not a regular file"),
        ("./not-executable", "not executable"),
    ],
)
def test_command_not_usable(tmp_path: Path, argv0: str, fragment: str) -> None:
    (tmp_path / "bin").mkdir()
    (tmp_path / "not-executable").write_text("#!/bin/sh\n", encoding="utf-8")
    config = write(
        tmp_path / "c.toml",
        f"""
        [hooks.archive]
        type = "command"
        argv = ["{argv0}", "--dest", "/srv"]
        """,
    )
    error = load_error(config, env={"PATH": str(tmp_path / "bin")})
    assert_located(error, config, "hooks.archive.argv[0]", 3)
    assert fragment in error.message


# ------------------------------------------------------------- secrets stay hidden


def test_secrets_never_in_repr_or_str(tmp_path: Path) -> None:
    (tmp_path / "s").write_text(WHSEC, encoding="utf-8")
    config = write(
        tmp_path / "c.toml",
        f"""
        [daemon]
        database = "postgresql://cw:DBPASSWORD@db.internal/cw"

        [servers.local]
        url = "http://127.0.0.1:8188"
        headers = {{ Authorization = "{HEADER_SECRET}", "X-Api-Key" = "APIKEYVALUE" }}

        [hooks.notify]
        type = "webhook"
        url = "https://hooks.example.com/services/PATHTOKEN"
        secret_file = "s"
        headers = {{ "X-Hook-Token" = "HOOKHEADERVALUE" }}
        """,
    )
    settings = load_settings(config, env={})
    assert settings.daemon.database_url == "postgresql://cw:DBPASSWORD@db.internal/cw"
    hidden = [
        HEADER_SECRET,
        "TOPSECRET",
        "APIKEYVALUE",
        "HOOKHEADERVALUE",
        "DBPASSWORD",
        "PATHTOKEN",
        WHSEC,
        WHSEC.removeprefix("whsec_"),
        repr(SECRET_KEY),
        SECRET_KEY.decode(),
    ]
    texts = [
        repr(settings),
        str(settings),
        repr(settings.daemon),
        repr(settings.servers),
        repr(settings.servers["local"]),
        str(settings.servers["local"]),
        repr(settings.servers["local"].headers),
        repr(settings.hooks["notify"]),
        str(settings.hooks["notify"]),
        f"{settings.hooks['notify']}",
    ]
    for text in texts:
        for secret in hidden:
            assert secret not in text, (secret, text)
    assert "Authorization" in repr(settings.servers["local"])  # names are fine to show
    assert "db.internal" in repr(settings.daemon)


@pytest.mark.parametrize(
    "server_lines",
    [
        # A bad value beside the secret: the error must not quote any value.
        f'headers = {{ Authorization = "{HEADER_SECRET}\\n" }}',
        f'headers = {{ Authorization = "{HEADER_SECRET}", "Bad Name" = "{HEADER_SECRET}" }}',
        f'headers = {{ Authorization = ["{HEADER_SECRET}"] }}',
        f'headers = {{ Authorization = "{HEADER_SECRET}" }}\nrequest_timeout_s = "{HEADER_SECRET}"',
        f'headers = {{ Authorization = "{HEADER_SECRET}" }}\nextra = "{HEADER_SECRET}"',
    ],
    ids=["line-break", "bad-header-name", "wrong-type", "other-key-wrong-type", "unknown-key"],
)
def test_secrets_never_in_error_messages(tmp_path: Path, server_lines: str) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f'[servers.local]\nurl = "http://h"\n{server_lines}\n', encoding="utf-8")
    error = load_error(config)
    assert error.key is not None
    assert error.key.startswith("servers.local.")
    rendered = "".join(traceback.format_exception(error))
    assert "TOPSECRET" not in rendered
    assert error.__cause__ is None
    assert error.__context__ is None  # the pydantic error (which quotes input) is not chained


def test_url_with_token_not_in_error(tmp_path: Path) -> None:
    config = write(
        tmp_path / "c.toml",
        '[hooks.w]\ntype = "webhook"\nurl = "ftp://TOPSECRET@x/y"\n',
    )
    error = load_error(config)
    assert_located(error, config, "hooks.w.url", 3)
    assert "TOPSECRET" not in str(error)


def test_redact_url() -> None:
    assert redact_url("postgresql://u:pw@h/db") == "postgresql://u:***@h/db"
    assert redact_url("postgresql://u@h/db") == "postgresql://u@h/db"
    assert redact_url("sqlite:////var/lib/x.db") == "sqlite:////var/lib/x.db"


# --------------------------------------------------------------------- fingerprint


def test_fingerprint_tracks_the_main_file_not_the_spool(tmp_path: Path) -> None:
    """Rewriting the main file changes it; files coming and going in jobs_dir do not (the
    daemon ingests them without a reload)."""
    config = spool_config(tmp_path)
    jobs_dir = tmp_path / "jobs.d"
    settings = load_settings(config, env={})
    before = config_fingerprint(settings)
    assert before == settings.fingerprint
    assert config_fingerprint(settings) == before  # stable while nothing changes

    jobs_dir.mkdir()
    tmp = write(jobs_dir / ".a.toml.tmp", '[[jobs]]\nserver = "local"\nprompt_id = "a"\n')
    tmp.rename(jobs_dir / "a.toml")
    assert config_fingerprint(settings) == before

    stat = config.stat()
    config.write_text(config.read_text(encoding="utf-8").replace("x", "y"), encoding="utf-8")
    os.utime(config, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size, same mtime
    assert config_fingerprint(settings) != before  # ctime still moves


def test_fingerprint_taken_before_reading(tmp_path: Path) -> None:
    """settings.fingerprint matches a reload of unchanged files, so no spurious reloads."""
    config = spool_config(tmp_path)
    settings = load_settings(config, env={})
    assert config_fingerprint(settings) == settings.fingerprint
    assert load_settings(config, env={}).fingerprint == settings.fingerprint


def test_fingerprint_tracks_secret_file(tmp_path: Path) -> None:
    secret = tmp_path / "notify.secret"
    secret.write_text(WHSEC, encoding="utf-8")
    settings = load_settings(webhook_config(tmp_path, 'secret_file = "notify.secret"'), env={})
    before = config_fingerprint(settings)
    assert before == settings.fingerprint
    secret.write_text(WHSEC + "\n", encoding="utf-8")
    assert config_fingerprint(settings) != before


# ------------------------------------------------------------------ defaults, files


def test_default_config_path() -> None:
    assert default_config_path({}) == DEFAULT_CONFIG_PATH
    assert Path("/etc/comfywatch/comfywatch.toml") == DEFAULT_CONFIG_PATH
    assert default_config_path({"COMFYWATCH_CONFIG": ""}) == DEFAULT_CONFIG_PATH
    assert default_config_path({"COMFYWATCH_CONFIG": "/x/y.toml"}) == Path("/x/y.toml")


def test_shipped_example_config_loads(tmp_path: Path) -> None:
    """config/comfywatch.toml loads as shipped; the sample spool file is valid against it."""
    settings = load_settings(REPO / "config" / "comfywatch.toml", env={})
    assert settings.daemon.database_url == "sqlite:////var/lib/comfywatch/comfywatch.db"
    assert settings.daemon.jobs_dir == Path("/var/lib/comfywatch/spool")
    assert settings.daemon.keep_registered_files is True
    assert settings.servers["local"].url == "http://127.0.0.1:8188"
    assert settings.jobs == ()

    sample = REPO / "config" / "spool-example.toml"
    jobs = read_spool_file(sample, settings)
    assert len(jobs) == 2
    assert all(job.server == "local" for job in jobs)


def test_shipped_quickstart_config_loads() -> None:
    """config/quickstart.toml: the database and the spool beside it."""
    settings = load_settings(REPO / "config" / "quickstart.toml", env={})
    assert settings.daemon.jobs_dir == REPO / "config" / "jobs.d"
    assert settings.jobs == ()
    jobs = read_spool_file(REPO / "config" / "spool-example.toml", settings)
    assert len(jobs) == 2


def test_settings_type_is_exported() -> None:
    assert {field.name for field in dataclasses.fields(Settings)} >= {
        "path",
        "daemon",
        "servers",
        "hooks",
        "jobs",
    }
