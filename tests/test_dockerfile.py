"""The Dockerfile, kept honest without Docker.

No container engine can build on the development machines, so this module reads the
Dockerfile and replays its steps on the host instead:

* ``COPY`` copies its sources from the repository into a temporary stand-in for ``/app``;
* the ``RUN`` step(s) doing ``pip install`` run, with ``/app`` translated, in a brand-new
  ``python -m venv`` (so a real, non-editable install is built from the copied files only);
* ``ENV`` values are applied (``/data`` becomes a temporary data directory);
* the container command (``ENTRYPOINT``/``CMD``) runs through ``sh -c`` with the SMTP address
  ``0.0.0.0:2525`` replaced by a free loopback port, a mail is sent to it with smtplib, the
  resulting ticket is read back with the venv's ``mailgw tickets list --json``, and SIGTERM
  must stop the command with exit status 0 (which needs ``exec`` in a shell-form command).

Every command runs from a temporary directory, never from the checkout, so the source tree
cannot stand in for a broken install. Steps that need root (creating the user) are not
replayed; what they must achieve is checked statically instead.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import time
import tomllib
import uuid
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
CONTAINER_PORT = 2525
CONTAINER_SMTP = f"0.0.0.0:{CONTAINER_PORT}"
# Container directories the replay knows how to map onto the host (name of the temp subdir).
CONTAINER_DIRS = {"/app": "app", "/data": "data"}
_CONTAINER_PATH = re.compile(r"(?<![\w./-])(/app|/data)(?![\w.-])")
_EDITABLE = re.compile(r"(?:^|\s)(?:-e|--editable)(?:\s|=|$)")


# --- Dockerfile parsing -------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case, e.g. "COPY"
    args: str  # everything after the keyword, continuation lines joined
    line: int  # 1-based line where the instruction starts

    def exec_form(self) -> list[str] | None:
        """The JSON ("exec") form of the arguments, or None for the shell form."""
        text = self.args.strip()
        if not text.startswith("["):
            return None
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            return None
        assert isinstance(value, list) and all(isinstance(v, str) for v in value), self
        return value

    def argv(self) -> list[str]:
        """A CMD/ENTRYPOINT/HEALTHCHECK command as argv; the shell form runs under /bin/sh -c."""
        return self.exec_form() or ["/bin/sh", "-c", self.args.strip()]


def parse_dockerfile(text: str) -> list[Instruction]:
    """Split a Dockerfile into instructions (comments dropped, ``\\`` continuations joined)."""
    out: list[Instruction] = []
    parts: list[str] = []
    start = 0
    for n, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue  # Docker drops comment and empty lines, even inside a continuation
        if not parts:
            start = n
        if stripped.endswith("\\"):
            parts.append(stripped[:-1].strip())
            continue
        parts.append(stripped)
        keyword, _, args = " ".join(parts).partition(" ")
        out.append(Instruction(keyword.upper(), args.strip(), start))
        parts = []
    assert not parts, "Dockerfile ends inside a line continuation"
    return out


def env_pairs(ins: Instruction) -> list[tuple[str, str]]:
    words = shlex.split(ins.args)
    if words and "=" not in words[0]:  # legacy form: ENV KEY value with spaces
        key, _, value = ins.args.partition(" ")
        return [(key, value.strip())]
    pairs = []
    for w in words:
        key, sep, value = w.partition("=")
        assert sep, f"Dockerfile line {ins.line}: cannot parse ENV {ins.args!r}"
        pairs.append((key, value))
    return pairs


def copy_sources(ins: Instruction) -> tuple[list[str], str]:
    words = ins.exec_form() or shlex.split(ins.args)
    flags = [w for w in words if w.startswith("--")]
    assert not any(f.startswith("--from") for f in flags), f"line {ins.line}: COPY --from"
    words = [w for w in words if not w.startswith("--")]
    assert len(words) >= 2, f"Dockerfile line {ins.line}: COPY needs a source and a dest"
    return words[:-1], words[-1]


def container_command(instructions: list[Instruction]) -> list[str]:
    """ENTRYPOINT + CMD as the argv the container starts with (last of each wins)."""
    entry = [i for i in instructions if i.keyword == "ENTRYPOINT"]
    cmd = [i for i in instructions if i.keyword == "CMD"]
    argv = (entry[-1].argv() if entry else []) + (cmd[-1].argv() if cmd else [])
    assert argv, "the Dockerfile has neither CMD nor ENTRYPOINT"
    return argv


def healthcheck_argv(instructions: list[Instruction]) -> list[str] | None:
    checks = [i for i in instructions if i.keyword == "HEALTHCHECK"]
    if not checks:
        return None
    m = re.fullmatch(r"((?:--\S+\s+)*)(CMD|NONE)\s*(.*)", checks[-1].args, re.S | re.I)
    assert m, f"Dockerfile line {checks[-1].line}: cannot parse HEALTHCHECK"
    if m.group(2).upper() == "NONE":
        return None
    return Instruction("CMD", m.group(3), checks[-1].line).argv()


def as_script(argv: list[str]) -> str:
    """The container command as one ``sh -c`` script."""
    if len(argv) >= 3 and Path(argv[0]).name in ("sh", "bash") and argv[1] == "-c":
        return argv[2]
    return shlex.join(argv)


@pytest.fixture(scope="module")
def instructions() -> list[Instruction]:
    assert DOCKERFILE.is_file(), f"{DOCKERFILE} is missing"
    return parse_dockerfile(DOCKERFILE.read_text())


# --- static checks --------------------------------------------------------------------------


def test_dockerfile_declares_base_user_volume_port_and_command(instructions):
    """What the replay cannot run (it is not root and has no image) is checked as written:
    the base image, that everything the wheel is built from is copied, that the image drops
    root for a user it creates and hands /data to, and the ENV/VOLUME/EXPOSE/CMD contract."""
    kw = [i.keyword for i in instructions]
    froms = [i.args.split()[-1] for i in instructions if i.keyword == "FROM"]
    assert froms == ["python:3.11-slim"], froms

    # Everything the wheel is built from is copied: package, force-included defaults, readme.
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    wheel = project["tool"]["hatch"]["build"]["targets"]["wheel"]
    needed = {"pyproject.toml", project["project"]["readme"], *wheel["packages"],
              *wheel.get("force-include", {})}
    copied = {s.rstrip("/") for i in instructions if i.keyword == "COPY"
              for s in copy_sources(i)[0]}
    assert needed <= copied, f"COPY misses {sorted(needed - copied)}"
    for src in copied:
        assert (ROOT / src).exists(), f"COPY source {src} does not exist in the repository"
    assert "ADD" not in kw, "use COPY, not ADD"

    env = {k: v for i in instructions if i.keyword == "ENV" for k, v in env_pairs(i)}
    assert env.get("MAILGW_HOME") == "/data", env

    volumes = [v for i in instructions if i.keyword == "VOLUME"
               for v in (i.exec_form() or i.args.split())]
    assert "/data" in volumes, volumes
    exposed = [p.split("/")[0] for i in instructions if i.keyword == "EXPOSE"
               for p in i.args.split()]
    assert str(CONTAINER_PORT) in exposed, exposed

    # The container runs as a non-root user, which the image creates, and /data is handed to
    # it before VOLUME (a fresh named volume takes the mount point's ownership).
    users = [i for i in instructions if i.keyword == "USER"]
    assert users, "the container would run as root: no USER instruction"
    user = users[-1].args.split(":")[0].strip()
    assert user not in ("root", "0", ""), f"USER {user} is root"
    cmd_at = max(i.line for i in instructions if i.keyword in ("CMD", "ENTRYPOINT"))
    assert users[-1].line < cmd_at
    runs = [i for i in instructions if i.keyword == "RUN"]
    if not user.isdigit():
        assert any(re.search(r"\b(useradd|adduser)\b", r.args) and user in r.args
                   for r in runs), f"no RUN creates the user {user}"
    volume_at = min(i.line for i in instructions if i.keyword == "VOLUME")
    assert any(r.line < volume_at and "/data" in r.args and "chown" in r.args for r in runs), \
        "no RUN before VOLUME makes /data owned by the unprivileged user"
    pip_runs = [r for r in runs if "pip install" in r.args]
    assert pip_runs and all(r.line < users[-1].line for r in pip_runs), \
        "pip install must run (as root) before USER"
    assert not any(_EDITABLE.search(r.args) for r in pip_runs), "the install must not be editable"

    script = as_script(container_command(instructions))
    assert re.search(r"mailgw init /data --exist-ok", script), script
    assert f"mailgw run --smtp {CONTAINER_SMTP}" in script, script

    health = healthcheck_argv(instructions)
    if health is not None:
        assert "python" in " ".join(health) and str(CONTAINER_PORT) in " ".join(health), health


# --- the replay -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def host_env(venv: Path) -> dict[str, str]:
    """The host environment minus anything that could point Python at the checkout."""
    drop = {"PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV", "PYTHONSAFEPATH"}
    env = {k: v for k, v in os.environ.items()
           if k not in drop and not k.startswith("MAILGW_")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}"
    return env


@dataclass
class Replay:
    root: Path  # stands in for the container's /
    venv: Path
    env: dict[str, str]  # the host env plus the Dockerfile's ENV, translated
    workdir: Path  # host directory standing in for the current WORKDIR
    workdir_container: str = "/"
    pip_runs: int = 0

    def path(self, container_path: str) -> Path:
        for prefix, name in CONTAINER_DIRS.items():
            if container_path == prefix or container_path.startswith(prefix + "/"):
                return self.root / name / container_path[len(prefix):].lstrip("/")
        raise AssertionError(f"the replay does not know where {container_path} goes")

    def translate(self, text: str, *, quote: bool) -> str:
        def repl(m: re.Match[str]) -> str:
            p = str(self.path(m.group(1)))
            return shlex.quote(p) if quote else p

        return _CONTAINER_PATH.sub(repl, text)

    def copy(self, ins: Instruction) -> None:
        sources, dest = copy_sources(ins)
        if not dest.startswith("/"):
            dest = str(Path(self.workdir_container, dest))
        target = self.path(dest)
        for src in sources:
            s = ROOT / src
            assert s.exists(), f"Dockerfile line {ins.line}: COPY source {src} is missing"
            if s.is_dir():  # Docker copies a directory's contents
                shutil.copytree(s, target, dirs_exist_ok=True)
            elif dest.endswith("/") or len(sources) > 1:
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy2(s, target / s.name)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(s, target)

    def run_pip(self, ins: Instruction) -> None:
        command = ins.exec_form()
        script = shlex.join(command) if command else ins.args
        # pip may use its normal cache here: the image build wants none, the test wants speed.
        script = re.sub(r"\s--no-cache-dir\b", "", self.translate(script, quote=True))
        proc = subprocess.run(["sh", "-c", script], cwd=self.workdir, env=self.env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, (f"RUN at Dockerfile line {ins.line} failed "
                                      f"({proc.returncode}): {script}\n{proc.stdout}\n"
                                      f"{proc.stderr}")
        self.pip_runs += 1


def replay_build(instructions: list[Instruction], tmp: Path) -> Replay:
    """Replay FROM..CMD on the host: COPY, WORKDIR, ENV and the pip RUN steps."""
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, cwd=tmp,
                   capture_output=True, timeout=120)
    r = Replay(root=tmp / "root", venv=venv, env=host_env(venv), workdir=tmp)
    for ins in instructions:
        if ins.keyword == "WORKDIR":
            r.workdir_container = ins.args.strip()
            r.workdir = r.path(r.workdir_container)
            r.workdir.mkdir(parents=True, exist_ok=True)
        elif ins.keyword == "COPY":
            r.copy(ins)
        elif ins.keyword == "ENV":
            for key, value in env_pairs(ins):
                r.env[key] = r.translate(value, quote=False)
        elif ins.keyword == "RUN" and "pip install" in ins.args:
            r.run_pip(ins)
        # Other RUN steps (creating the user) need root and are checked statically.
    assert r.pip_runs, "the Dockerfile has no RUN step doing `pip install`"
    return r


@dataclass
class Container:
    """The container command running on the host, its output in a log file."""

    proc: subprocess.Popen[bytes]
    log: Path
    port: int

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_listening(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the container command exited {self.proc.returncode} "
                                     f"before listening:\n{self.output()}")
            if port_open(self.port):
                return
            time.sleep(0.1)
        raise AssertionError(f"nothing listened on port {self.port} in {timeout}s:\n"
                             f"{self.output()}")

    def terminate(self, timeout: float = 30) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the container command ignored SIGTERM for {timeout}s:\n"
                                 f"{self.output()}") from None

    def kill(self) -> None:
        # The command runs in its own session: this also ends a gateway left behind by a sh
        # that died on SIGTERM without passing it on.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


def start_container(r: Replay, script: str, port: int) -> Container:
    log = r.root / f"container-{time.monotonic_ns()}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(["sh", "-c", script], cwd=r.workdir, env=r.env, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    return Container(proc, log, port)


def mailgw_json(r: Replay, *args: str) -> list[dict]:
    proc = subprocess.run([str(r.venv / "bin" / "mailgw"), *args, "--json"], cwd=r.root,
                          env=r.env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"mailgw {' '.join(args)} exited {proc.returncode}:\n" \
                                 f"{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout)


def wait_for_tickets(r: Replay, count: int, timeout: float = 60) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        rows = mailgw_json(r, "tickets", "list")
        if len(rows) >= count or time.monotonic() > deadline:
            return rows
        time.sleep(0.3)


@pytest.mark.timeout(600)
def test_dockerfile_steps_install_and_serve_mail_in_clean_venv(instructions, tmp_path):
    """Replay the Dockerfile in a fresh venv: the non-editable install carries the defaults,
    the container command initialises /data, accepts a mail on its SMTP port and turns it into
    a ticket, stops with status 0 on SIGTERM, and starts again on the existing home."""
    r = replay_build(instructions, tmp_path)
    bin_dir = r.venv / "bin"

    # The CLI works from the venv, run outside the checkout.
    helped = subprocess.run([str(bin_dir / "mailgw"), "--help"], cwd=r.root, env=r.env,
                            capture_output=True, text=True, timeout=60)
    assert helped.returncode == 0, helped.stderr
    for command in ("init", "run", "tickets"):
        assert re.search(rf"^\s+{command}\b", helped.stdout, re.M), helped.stdout

    # The package is imported from the venv (not the checkout, not the copied /app), is not an
    # editable install, and carries the shipped defaults under mailgw/_defaults.
    probe = subprocess.run(
        [str(bin_dir / "python"), "-c",
         "import json, pathlib, importlib.metadata as m, mailgw\n"
         "d = m.distribution('mailgw')\n"
         "print(json.dumps({'pkg': str(pathlib.Path(mailgw.__file__).resolve().parent),\n"
         "  'direct_url': json.loads(d.read_text('direct_url.json') or '{}')}))"],
        cwd=r.root, env=r.env, capture_output=True, text=True, timeout=60)
    assert probe.returncode == 0, probe.stderr
    info = json.loads(probe.stdout)
    pkg = Path(info["pkg"])
    assert pkg.is_relative_to(r.venv.resolve()), f"mailgw imported from {pkg}, not the venv"
    assert not info["direct_url"].get("dir_info", {}).get("editable"), info["direct_url"]
    shipped = pkg / "_defaults" / "config" / "mailgw.yaml"
    assert shipped.is_file(), f"{shipped} is not in the installed package"
    assert shipped.read_bytes() == (ROOT / "config" / "mailgw.yaml").read_bytes()
    for part in ("templates", "filters"):
        for f in (ROOT / part).iterdir():
            if f.is_file():
                assert (pkg / "_defaults" / part / f.name).is_file(), f"{part}/{f.name} missing"

    # The container command, with /app and /data translated and a loopback port.
    port = free_port()
    script = r.translate(as_script(container_command(instructions)), quote=True)
    assert CONTAINER_SMTP in script, script
    script = script.replace(CONTAINER_SMTP, f"127.0.0.1:{port}")
    health = healthcheck_argv(instructions)
    health_script = None
    if health is not None:
        health_script = re.sub(rf"\b{CONTAINER_PORT}\b", str(port),
                               r.translate(as_script(health), quote=True))
    data = r.path("/data")
    assert r.env.get("MAILGW_HOME") == str(data), r.env.get("MAILGW_HOME")

    def healthcheck() -> int:
        assert health_script is not None
        return subprocess.run(["sh", "-c", health_script], cwd=r.workdir, env=r.env,
                              capture_output=True, timeout=30).returncode

    if health_script is not None:
        assert healthcheck() != 0, "the HEALTHCHECK passes with nothing listening"

    container = start_container(r, script, port)
    try:
        container.wait_listening()
        # `mailgw init` filled the empty home from the wheel's defaults, and added a
        # machine_mail secret of its own (docs/machine-mail.md).
        written = (data / "config" / "mailgw.yaml").read_bytes()
        assert written.startswith(shipped.read_bytes())
        assert b"\nmachine_mail:\n  secret: " in written[len(shipped.read_bytes()):]
        assert (data / "templates").is_dir() and (data / "store").is_dir()
        if health_script is not None:
            assert healthcheck() == 0, "the HEALTHCHECK fails while the gateway listens"

        subject = f"Container smoke test {uuid.uuid4().hex[:8]}"
        msg = EmailMessage()
        msg["From"] = "Alice Example <alice@customer.test>"
        msg["To"] = "support@example.com"
        msg["Subject"] = subject
        msg.set_content("Sent to the gateway started by the Dockerfile's command.")
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
            refused = smtp.send_message(msg)
        assert refused == {}, refused

        rows = wait_for_tickets(r, 1)
        assert len(rows) == 1, f"{rows}\n{container.output()}"
        [ticket] = rows
        assert ticket["queue"] == "support", ticket
        assert ticket["title"] == subject, ticket
        assert ticket["customer"] == "alice@customer.test", ticket
        assert (data / "store" / "mailgw.db").is_file()  # the default store lives in /data

        code = container.terminate()
        assert code == 0, (f"exit status {code} after SIGTERM (a shell-form command needs "
                           f"`exec` for the signal to reach mailgw):\n{container.output()}")
        assert not port_open(port), "the port is still open after the command exited"
        if health_script is not None:
            assert healthcheck() != 0, "the HEALTHCHECK passes after the gateway stopped"

        # A restart on the existing home (the volume kept) works and keeps the ticket.
        container = start_container(r, script, port)
        container.wait_listening()
        assert [t["number"] for t in mailgw_json(r, "tickets", "list")] == [ticket["number"]]
        code = container.terminate()
        assert code == 0, f"exit status {code} after SIGTERM on restart:\n{container.output()}"
    finally:
        container.kill()
