"""The built wheel carries everything the gateway reads by default: installed (not editable) in a
fresh virtual environment, `scopegate serve --dev` and `scopegate policy check` work from an empty
folder with no repository in sight."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import threading
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHIPPED = ["model.conf", "policy.csv", "constraints.yaml", "tests.yaml", "routes/fly-machines.yaml",
           "routes/fly-api.yaml", "routes/fly-graphql.yaml"]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A virtual environment with the wheel installed; its dependencies come from the test
    interpreter's site-packages (listed in a .pth file, so that environment's editable finder for
    the repository is never loaded)."""
    base = tmp_path_factory.mktemp("wheel")
    source = base / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / "gateway", source / "gateway", symlinks=True, ignore=ignore)
    shutil.copytree(REPO / "policies", source / "policies", ignore=ignore)
    wheels = base / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(wheels), str(source)], base)
    (wheel,) = wheels.glob("scopegate-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    assert {f"gateway/policies/{name}" for name in SHIPPED} <= names, sorted(n for n in names if "polic" in n)

    venv = base / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], base)
    python = venv / "bin" / "python"
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], base))
    deps = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (site / "scopegate_test_deps.pth").write_text("".join(f"{path}\n" for path in deps))
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "--quiet",
          str(wheel)], base)
    return venv


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("SCOPEGATE_", "PYTHON", "VIRTUAL_ENV", "FLY_"))}


def _run(argv: list[str], cwd: Path) -> str:
    result = subprocess.run(argv, cwd=cwd, env=_clean_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{argv}: {result.stdout}{result.stderr}"
    return result.stdout.strip()


def test_the_wheel_imports_from_its_own_install(installed: Path, tmp_path: Path) -> None:
    where = _run([str(installed / "bin" / "python"), "-c", "import gateway; print(gateway.__file__)"], tmp_path)
    assert Path(where).is_relative_to(installed), where


def test_policy_check_from_an_empty_folder_uses_the_shipped_files(installed: Path, tmp_path: Path) -> None:
    out = _run([str(installed / "bin" / "scopegate"), "policy", "check"], tmp_path)
    assert out.startswith("policy ok: 76 routes"), out


def test_serve_dev_from_an_empty_folder_answers_requests(installed: Path, tmp_path: Path) -> None:
    proc = subprocess.Popen([str(installed / "bin" / "scopegate"), "serve", "--dev", "--port", "0"], cwd=tmp_path,
                            env=_clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killer = threading.Timer(45, proc.kill)
    killer.start()
    try:
        assert proc.stdout is not None
        seen: list[str] = []
        base = token = ""
        for line in proc.stdout:
            seen.append(line)
            if line.startswith("Listening on "):
                base = line.split()[-1]
            if line.strip().startswith("export DEPLOY_TOKEN="):
                token = line.strip().removeprefix("export DEPLOY_TOKEN=")
                break
        assert base and token, "".join(seen)
        request = urllib.request.Request(f"{base}/v1/apps/web-staging/machines",
                                         headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200
            assert isinstance(json.loads(response.read()), list)
        denied = urllib.request.Request(f"{base}/v1/apps/web-prod/machines",
                                        headers={"Authorization": f"Bearer {token}"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(denied, timeout=10)
        assert refused.value.code == 403
        refused.value.close()
    finally:
        killer.cancel()
        proc.terminate()
        proc.wait(timeout=15)
        if proc.stdout is not None:
            proc.stdout.close()
    assert not list(tmp_path.iterdir()), "dev mode wrote into the folder it started in"
