"""``mailgw config check``, ``mailgw init`` and ``--help`` everywhere."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mailgw.settings import ConfigError, Home, load_settings

COMMANDS = [[], ["init"], ["run"], ["deliver"], ["tickets"], ["tickets", "list"],
            ["tickets", "show"], ["tickets", "state"], ["config"], ["config", "check"], ["quarantine"],
            ["quarantine", "list"], ["quarantine", "replay"]]


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: " ".join(c) or "mailgw")
def test_every_command_has_help(cmd):
    proc = subprocess.run([sys.executable, "-m", "mailgw", *cmd, "--help"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Usage: ")


def _home_with(tmp_path, text: str) -> Home:
    from mailgw.home import init_home

    init_home(tmp_path)
    (tmp_path / "config" / "mailgw.yaml").write_text(text)
    return Home(tmp_path)


def test_shipped_config_is_valid(tmp_path):
    from mailgw.home import init_home

    init_home(tmp_path)
    settings = load_settings(Home(tmp_path))
    assert [q.name for q in settings.queues] == ["support", "billing"]
    assert settings.smtp.listen == "127.0.0.1:2525"
    assert settings.relay is None


def test_bad_values_are_reported_with_file_line_and_path(tmp_path):
    home = _home_with(tmp_path, """\
smtp:
  listen: localhost
  max_mesage_size: 10
queues:
  - name: support
    addresses: [support@example.com]
  - name: sales
    addresses: [not-an-address]
    on_closed_reply: reopen-please
""")
    with pytest.raises(ConfigError) as err:
        load_settings(home)
    errors = "\n".join(err.value.errors)
    f = str(tmp_path / "config" / "mailgw.yaml")
    assert f"{f}:2: smtp.listen: expected HOST:PORT, got 'localhost'" in errors
    assert f"{f}:3: smtp.max_mesage_size: unknown key" in errors
    assert f"{f}:8: queues[1].addresses: not an email address: 'not-an-address'" in errors
    assert f"{f}:9: queues[1].on_closed_reply:" in errors
    assert len(err.value.errors) == 4


def test_yaml_syntax_error_names_the_line(tmp_path):
    home = _home_with(tmp_path, "queues:\n  - name: support\n   addresses: [a@b.c\n")
    with pytest.raises(ConfigError) as err:
        load_settings(home)
    assert ":3: invalid YAML" in err.value.errors[0] or ":4: invalid YAML" in err.value.errors[0]


def test_cross_field_errors(tmp_path):
    home = _home_with(tmp_path, """\
default_queue: nowhere
queues:
  - {name: a, addresses: [x@example.com]}
  - {name: b, addresses: [X@example.com]}
""")
    with pytest.raises(ConfigError) as err:
        load_settings(home)
    assert "x@example.com is served by both a and b" in err.value.errors[0]


def test_config_check_command_exit_codes(tmp_path):
    from mailgw.home import init_home

    init_home(tmp_path)
    run = lambda: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "mailgw", "--home", str(tmp_path), "config", "check"],
        capture_output=True, text=True, timeout=30)
    ok = run()
    assert ok.returncode == 0 and "config OK" in ok.stdout
    cfg = tmp_path / "config" / "mailgw.yaml"
    cfg.write_text(cfg.read_text().replace("generator: date", "generator: daily"))
    bad = run()
    assert bad.returncode != 0
    assert "ticket_numbers.generator" in bad.stderr and "mailgw.yaml:" in bad.stderr
    # a template with a syntax error is reported too
    cfg.write_text(cfg.read_text().replace("generator: daily", "generator: date"))
    (tmp_path / "templates" / "ack_new.j2").write_text("{% block subject %}{{ x {% endblock %}")
    tmpl = run()
    assert tmpl.returncode != 0 and "templates/ack_new.j2:1" in tmpl.stderr


def test_init_refuses_existing_home_and_keeps_edits(tmp_path):
    from mailgw.home import init_home

    init_home(tmp_path)
    cfg = tmp_path / "config" / "mailgw.yaml"
    cfg.write_text(cfg.read_text() + "\n# my edit\n")
    with pytest.raises(FileExistsError):
        init_home(tmp_path)
    init_home(tmp_path, exist_ok=True)
    assert cfg.read_text().endswith("# my edit\n")
    assert (tmp_path / "templates" / "ack_new.j2").is_file()
    assert (tmp_path / "store").is_dir()


def test_port_in_use_is_a_clear_error(tmp_path):
    import socket

    from mailgw.home import init_home

    init_home(tmp_path)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "mailgw", "--home", str(tmp_path), "run", "--smtp",
             f"127.0.0.1:{port}"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 78
    assert f"cannot listen for SMTP on 127.0.0.1:{port}" in proc.stderr
    assert "Traceback" not in proc.stderr
