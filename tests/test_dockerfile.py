"""The Dockerfile: linted with hadolint, non-root, health-checked, configured by environment."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

from gateway.config import load_config

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"


def _instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    result = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            result.append((word.upper(), rest.strip()))
    return result


def test_hadolint_passes() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    result = subprocess.run([str(hadolint), str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_runs_as_a_numeric_non_root_user_with_a_healthcheck_on_healthz() -> None:
    instructions = _instructions()
    users = [rest for word, rest in instructions if word == "USER"]
    assert users and not users[-1].startswith(("root", "0"))
    assert re.fullmatch(r"\d+:\d+", users[-1])
    (health,) = [rest for word, rest in instructions if word == "HEALTHCHECK"]
    assert "/_gateway/healthz" in health
    assert ("ENTRYPOINT", '["scopegate"]') in instructions
    assert ("CMD", '["serve"]') in instructions
    assert instructions[0][0] == "FROM" and "slim" in instructions[0][1]


def test_environment_configuration_loads_with_the_real_loader() -> None:
    environ: dict[str, str] = {}
    for word, rest in _instructions():
        if word == "ENV":
            for pair in shlex.split(rest):
                name, _, value = pair.partition("=")
                environ[name] = value
    config = load_config(None, environ=environ)
    assert config.server_host == "0.0.0.0"
    assert config.store_url == "sqlite:////var/lib/scopegate/state.db"
    assert config.tokens_keyring == Path("/var/lib/scopegate/keyring.json")
    assert config.audit_sinks == ("stdout",)
    # No policy paths: the image reads the policies installed with the package (package data).
    assert not [name for name in environ if name.startswith(("SCOPEGATE_POLICY__", "SCOPEGATE_ROUTES"))]
    assert [path.name for path in config.routes] == ["fly-machines.yaml"]
    assert all(path.is_file() for path in (*config.routes, config.policy_model, config.policy_policy))


def test_the_image_installs_the_policies_as_package_data() -> None:
    copies = [rest for word, rest in _instructions() if word == "COPY"]
    assert "gateway ./gateway" in copies and "policies ./policies" in copies  # the link and its target
    assert (REPO / "gateway" / "policies").is_symlink()
    assert (REPO / "gateway" / "policies" / "model.conf").resolve() == (REPO / "policies" / "model.conf").resolve()
