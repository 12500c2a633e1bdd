"""`scopegate policy check|explain|test` against mistakes (issue 16 items 5 and 6), through the real
entry point: role names that only a typo made (did-you-mean), and dry runs that take the request
path's decision, body constraints included, naming the constraint that decided.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import CREDENTIAL_ENV, write_config

REPO = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "gateway.cli.main"]
IMAGES = "deployers ship images from the app's own Fly registry"
EXEC = "exec runs only diagnostic commands"


def scopegate(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCOPEGATE_") and k != CREDENTIAL_ENV}
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=30, check=False)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A config whose policy files are copies in `tmp_path/policies`, free to edit."""
    shutil.copytree(REPO / "policies", tmp_path / "policies")
    config = write_config(tmp_path, "http://127.0.0.1:9")
    document = yaml.safe_load(config.read_text())
    document["policy"] = {"model": "policies/model.conf", "policy": "policies/policy.csv",
                          "constraints": "policies/constraints.yaml"}
    document["routes"] = ["policies/routes/fly-machines.yaml"]
    config.write_text(yaml.safe_dump(document))
    return tmp_path


def edit_policy(folder: Path, old: str, new: str) -> None:
    path = folder / "policies/policy.csv"
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


# --- issue 16 item 5: a misspelled role is an error, not a new role ----------------------------------

@pytest.mark.parametrize(("old", "new", "named"), [
    pytest.param("g, deployer, viewer", "g, deployer, viewer\ng, deployr, viewer",
                 "role line 'g, deployr, viewer' names role 'deployr', which has no `p,` line of its own "
                 "(did you mean 'deployer'?)", id="child-typo"),
    pytest.param("g, operator, viewer", "g, operator, veiwer",
                 "role line 'g, operator, veiwer' names role 'veiwer', which has no `p,` line of its own "
                 "(did you mean 'viewer'?)", id="parent-typo"),
    # The production secrets deny moved to a role nobody holds: it would bind no one.
    pytest.param("p, deployer, *, production, secrets:write, deny", "p, deployr, *, production, secrets:write, deny",
                 "role 'deployr' has only deny lines and no `g,` line, so it allows nothing and its denies bind "
                 "no one (did you mean 'deployer'?)", id="deny-line-typo"),
])
def test_policy_check_refuses_a_misspelled_role(folder: Path, old: str, new: str, named: str) -> None:
    edit_policy(folder, old, new)
    result = scopegate("policy", "check", "--config", "scopegate.yaml", cwd=folder)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert named in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


@pytest.mark.parametrize(("old", "new", "named"), [
    pytest.param('roles: ["deployer"]\n    images:', 'roles: ["deployr"]\n    images:',
                 "constraint 'deployers ship images from the app's own Fly registry' roles names 'deployr', which "
                 "matches no role of the policy (did you mean 'deployer'?)", id="constraint-role-typo"),
    pytest.param('envs: ["production"]', 'envs: ["prodution"]',
                 "constraint 'production machines stay within size and regions' envs names 'prodution', which "
                 "matches no environment (did you mean 'production'?)", id="constraint-env-typo"),
])
def test_policy_check_refuses_a_constraint_that_would_bind_no_one(folder: Path, old: str, new: str,
                                                                  named: str) -> None:
    path = folder / "policies/constraints.yaml"
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))
    result = scopegate("policy", "check", "--config", "scopegate.yaml", cwd=folder)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert named in result.stderr


def test_policy_check_accepts_new_roles_that_define_themselves(folder: Path) -> None:
    edit_policy(folder, "# token-admin:", "\n".join([
        "p, auditor, *, *, secrets:list, allow",  # a new role with a line of its own, and inheritance
        "g, auditor, viewer",
        "p, no-prod-exec, *, production, machines:exec, deny",  # a deny-only mixin some role inherits
        "g, admin, no-prod-exec",
        "p, careful-viewer, *, production, secrets:list, deny",  # viewer less something: deny-only, inherits
        "g, careful-viewer, viewer",
        "# token-admin:"]))
    result = scopegate("policy", "check", "--json", "--config", "scopegate.yaml", cwd=folder)
    assert result.returncode == 0, result.stderr
    assert {"auditor", "no-prod-exec", "careful-viewer"} <= set(json.loads(result.stdout)["roles"])


def test_policy_test_refuses_cases_with_an_unknown_role(folder: Path) -> None:
    cases = folder / "cases.yaml"
    cases.write_text(yaml.safe_dump([{"name": "typo", "grants": ["deployr@app:web-staging"], "method": "GET",
                                      "path": "/v1/apps/web-staging", "expect": "deny"}]))
    result = scopegate("policy", "test", "--config", "scopegate.yaml", "cases.yaml", cwd=folder)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "case 1: grant deployr@app:web-staging: role 'deployr' is not in the policy (did you mean 'deployer'?)" \
        in result.stderr


def test_token_mint_refuses_while_the_policy_has_a_misspelled_role(folder: Path) -> None:
    assert scopegate("init", "--config", "scopegate.yaml", cwd=folder).returncode == 0
    edit_policy(folder, "g, deployer, viewer", "g, deployer, viewer\ng, deployr, viewer")
    result = scopegate("token", "mint", "--config", "scopegate.yaml", "--grant", "deployr@app:web", cwd=folder)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "deployr" in result.stderr and "did you mean 'deployer'?" in result.stderr
    assert "sgt_" not in result.stdout


# --- issue 16 item 6: explain and test take the request path's decision, constraints included -------

@pytest.fixture
def inited(folder: Path) -> Path:
    """`folder` with a keyring and a store (`policy explain` works on the local store in local mode)."""
    result = scopegate("init", "--config", "scopegate.yaml", cwd=folder)
    assert result.returncode == 0, result.stderr
    return folder


def explain(folder: Path, *args: str) -> tuple[int, dict[str, Any]]:
    result = scopegate("policy", "explain", "--json", "--config", "scopegate.yaml", *args, cwd=folder)
    assert result.returncode in (0, 1), result.stderr
    return result.returncode, json.loads(result.stdout)


def test_policy_explain_applies_the_body_constraints_and_names_the_one_that_decided(inited: Path) -> None:
    folder = inited
    deploy = ("--grant", "deployer@app:web-staging", "POST", "/v1/apps/web-staging/machines")
    code, refused = explain(folder, *deploy, "--body", '{"config":{"image":"docker.io/x"}}')
    assert code == 1
    assert refused["allowed"] is False and refused["status"] == 403 and refused["error"] == "forbidden"
    assert refused["constraint"] == IMAGES
    assert "field 'config.image' ('docker.io/x') is not from an allowed registry" in refused["reason"]
    assert refused["grant"] == "deployer@app:web-staging"  # the grant allowed it; the constraint did not

    code, allowed = explain(folder, *deploy, "--body", '{"config":{"image":"registry.fly.io/web-staging:1"}}')
    assert code == 0 and allowed["allowed"] is True
    assert IMAGES in allowed["constraints"] and allowed["constraint"] is None
    assert f"passes constraint(s) '{IMAGES}'" in allowed["reason"]

    plain = scopegate("policy", "explain", "--config", "scopegate.yaml", *deploy, "--body",
                      '{"config":{"image":"docker.io/x"}}', cwd=folder)
    assert plain.returncode == 1 and IMAGES in plain.stdout


def test_policy_explain_of_exec_without_an_allowed_command_is_refused(inited: Path) -> None:
    folder = inited
    exec_path = ("--grant", "admin@app:web-prod", "POST", "/v1/apps/web-prod/machines/m1/exec")
    code, refused = explain(folder, *exec_path, "--body", '{"command":["sh","-c","env"]}')
    assert code == 1 and refused["constraint"] == EXEC
    code, allowed = explain(folder, *exec_path, "--body", '{"command":["uptime"]}')
    assert code == 0 and allowed["allowed"] is True


def test_policy_explain_does_not_call_a_volume_check_passed(inited: Path) -> None:
    folder = inited
    # same_app_volumes asks the upstream; a dry run asks nothing and says so rather than "allowed".
    body = '{"config":{"image":"registry.fly.io/web-staging:1","mounts":[{"volume":"vol_123","path":"/d"}]}}'
    code, result = explain(folder, "--grant", "deployer@app:web-staging", "POST", "/v1/apps/web-staging/machines",
                           "--body", body)
    assert code == 1 and result["allowed"] is False
    assert result["constraint"] == "volumes, forks and restores stay within the app"
    assert "a dry run asks nothing upstream" in result["reason"]


def test_policy_test_runs_the_body_constraints(folder: Path) -> None:
    cases = folder / "cases.yaml"
    cases.write_text(yaml.safe_dump([
        {"name": "own image", "grants": ["deployer@app:web-staging"], "method": "POST",
         "path": "/v1/apps/web-staging/machines", "body": {"config": {"image": "registry.fly.io/web-staging:1"}},
         "expect": "allow"},
        {"name": "foreign image", "grants": ["deployer@app:web-staging"], "method": "POST",
         "path": "/v1/apps/web-staging/machines", "body": {"config": {"image": "docker.io/x"}}, "expect": "allow"},
    ]))
    result = scopegate("policy", "test", "--json", "--config", "scopegate.yaml", "cases.yaml", cwd=folder)
    assert result.returncode == 1, (result.stdout, result.stderr)
    report = json.loads(result.stdout)
    assert [c["ok"] for c in report["cases"]] == ["ok", "FAIL"]
    assert report["cases"][1]["got"] == "deny" and report["cases"][1]["constraint"] == IMAGES
