"""Request-shape constraints: what an allowed request's body may contain.

A decision says a role may perform an action on an app; a constraint narrows how. Constraints
are declared in `policy.constraints` (YAML), each applying to actions, roles and environments
(globs), and checked on the JSON body before forwarding:

- `images`: `config.image`, `config.containers[].image` (and a volume's `compute_image`) must be
  one of these repositories (globs; `{app}` is the app of the request), e.g. `registry.fly.io/{app}`;
- `regions`: the machine's `region` must be one of these;
- `max_guest`: upper bounds for `config.guest.cpus`, `memory_mb` (and `max_memory_mb`) and `gpus`,
  and a volume's `compute` alike; a `config.size` preset is refused;
- `commands`: `exec` may only run these argument lists (each element a glob), without `stdin`;
- `same_app_volumes`: `config.mounts[].volume`, `source_volume_id` and `snapshot_id` must
  belong to the app, which is asked of the upstream itself.

A violation is 403 naming the field. A body the constraint cannot read (not JSON, wrong shape,
both `cmd` and `command`, a size preset where sizes are bounded) is refused too: a constraint that
cannot be checked does not pass. The surface reads the body (core/jsonbody.py) and refuses fields
its route's schema does not list before the constraints see it.
"""

from __future__ import annotations

import shlex
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import yaml

from gateway.errors import BadRequest, ConfigError, Forbidden

# (app, volume id) -> does the volume belong to the app? / (app, snapshot id) -> same for snapshots.
OwnershipCheck = Callable[[str, str], Awaitable[bool]]
_KEYS = {"name", "actions", "roles", "envs", "images", "regions", "max_guest", "commands", "same_app_volumes"}
_GUEST_KEYS = {"cpus", "memory_mb", "gpus"}


@dataclass(frozen=True)
class Constraint:
    name: str
    actions: tuple[str, ...]
    roles: tuple[str, ...] = ("*",)
    envs: tuple[str, ...] = ("*",)
    images: tuple[str, ...] | None = None
    regions: tuple[str, ...] | None = None
    max_guest: tuple[tuple[str, int], ...] = ()
    commands: tuple[tuple[str, ...], ...] | None = None
    same_app_volumes: bool = False

    def applies(self, role: str, env: str, action: str) -> bool:
        return (any(fnmatchcase(action, a) for a in self.actions) and any(fnmatchcase(role, r) for r in self.roles)
                and any(fnmatchcase(env, e) for e in self.envs))


@dataclass(frozen=True)
class VolumeOwnership:
    volume: OwnershipCheck
    snapshot: OwnershipCheck


class ConstraintSet:
    def __init__(self, constraints: list[Constraint], source: Path | None = None) -> None:
        self.constraints = constraints
        self.source = source
        self._cache: dict[tuple[str, str, str], tuple[Constraint, ...]] = {}

    def applicable(self, role: str, env: str, action: str) -> tuple[Constraint, ...]:
        key = (role, env, action)
        found = self._cache.get(key)
        if found is None:
            found = tuple(c for c in self.constraints if c.applies(role, env, action))
            if len(self._cache) > 65_536:
                self._cache.clear()
            self._cache[key] = found
        return found

    def actions(self) -> set[str]:
        return {a for c in self.constraints for a in c.actions}

    @classmethod
    def load(cls, path: Path | None) -> ConstraintSet:
        if path is None:
            return cls([])
        try:
            document = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"constraints file {path} does not exist (policy.constraints)") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"constraints file {path} is not valid YAML: {exc}") from None
        if document is None:
            return cls([], path)
        if not isinstance(document, dict) or not isinstance(document.get("constraints", []), list):
            raise ConfigError(f"constraints file {path} must be a mapping with a `constraints:` list")
        return cls([_parse(item, f"{path}: constraint {i + 1}") for i, item in enumerate(document["constraints"])],
                   path)


def _strings(value: Any, where: str, key: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{where}: `{key}` must be a non-empty list of strings")
    return tuple(value)


def _parse(item: Any, where: str) -> Constraint:
    if not isinstance(item, dict):
        raise ConfigError(f"{where} must be a mapping")
    unknown = set(item) - _KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}; known: {sorted(_KEYS)}")
    name = item.get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{where}: `name` is required")
    where = f"{where} ({name})"
    guest: list[tuple[str, int]] = []
    if "max_guest" in item:
        raw = item["max_guest"]
        if not isinstance(raw, dict) or not raw or set(raw) - _GUEST_KEYS:
            raise ConfigError(f"{where}: `max_guest` takes {sorted(_GUEST_KEYS)}")
        for key, value in raw.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{where}: max_guest.{key} must be a whole number, 0 or more")
            guest.append((key, value))
    commands = None
    if "commands" in item:
        raw_commands = item["commands"]
        if not isinstance(raw_commands, list) or not all(
                isinstance(c, list) and c and all(isinstance(a, str) for a in c) for c in raw_commands):
            raise ConfigError(f"{where}: `commands` must be a list of argument lists, e.g. [[\"ls\", \"/data\"]]")
        commands = tuple(tuple(c) for c in raw_commands)
    same = item.get("same_app_volumes", False)
    if not isinstance(same, bool):
        raise ConfigError(f"{where}: `same_app_volumes` must be true or false")
    constraint = Constraint(
        name=name, actions=_strings(item.get("actions"), where, "actions"),
        roles=_strings(item.get("roles", ["*"]), where, "roles"), envs=_strings(item.get("envs", ["*"]), where, "envs"),
        images=_strings(item["images"], where, "images") if "images" in item else None,
        regions=_strings(item["regions"], where, "regions") if "regions" in item else None,
        max_guest=tuple(guest), commands=commands, same_app_volumes=same)
    if (constraint.images is None and constraint.regions is None and not constraint.max_guest
            and constraint.commands is None and not same):
        raise ConfigError(f"{where}: says nothing to check (images, regions, max_guest, commands, same_app_volumes)")
    return constraint


async def enforce(constraints: tuple[Constraint, ...], *, app: str, document: Any,
                  ownership: VolumeOwnership) -> None:
    """Raises Forbidden naming the field that breaks a constraint. `document` is the body as
    `jsonbody.load_strict` read it: keys case folded and unique, so `Image` cannot hide an image
    (the surface has also refused fields of the body the constraints do not know)."""
    if not constraints:
        return
    if not isinstance(document, dict):
        raise BadRequest("the request body must be a JSON object: a constraint applies to it")
    config = document.get("config") or {}
    if not isinstance(config, dict):
        raise BadRequest("field 'config' must be an object")
    for constraint in constraints:
        if constraint.images is not None:
            _check_images(constraint, document, config, app)
        if constraint.regions is not None and "region" in document:
            region = document["region"]
            if not isinstance(region, str) or region not in constraint.regions:
                raise Forbidden(f"field 'region' ({region!r}) is not allowed here by constraint '{constraint.name}'; "
                                f"allowed: {', '.join(constraint.regions)}")
        if constraint.max_guest:
            _check_guest(constraint, document, config)
        if constraint.commands is not None:
            _check_command(constraint, document)
        if constraint.same_app_volumes:
            await _check_volumes(constraint, document, config, app, ownership)


def image_repository(image: str) -> str:
    """`registry.fly.io/web:deploy-1` and `...@sha256:...` -> `registry.fly.io/web`."""
    name = image.split("@", 1)[0]
    slash = name.rfind("/")
    colon = name.rfind(":")
    return name[:colon] if colon > slash else name


def _check_images(constraint: Constraint, document: dict[str, Any], config: dict[str, Any], app: str) -> None:
    assert constraint.images is not None
    allowed = [pattern.replace("{app}", app) for pattern in constraint.images]
    fields: list[tuple[str, Any]] = []
    if "image" in config:
        fields.append(("config.image", config["image"]))
    if document.get("compute_image") is not None:  # a volume's compute (Volumes_create)
        fields.append(("compute_image", document["compute_image"]))
    containers = config.get("containers") or []
    if not isinstance(containers, list):
        raise BadRequest("field 'config.containers' must be a list")
    for index, container in enumerate(containers):
        if not isinstance(container, dict):
            raise BadRequest(f"field 'config.containers[{index}]' must be an object")
        if "image" in container:
            fields.append((f"config.containers[{index}].image", container["image"]))
    for field_name, image in fields:
        if not isinstance(image, str) or not any(fnmatchcase(image_repository(image), p) for p in allowed):
            raise Forbidden(f"field '{field_name}' ({image!r}) is not from an allowed registry by constraint "
                            f"'{constraint.name}'; allowed: {', '.join(allowed)}")


# Guest fields bounded by a max_guest key besides the key itself: memory may balloon up to max_memory_mb.
_ALSO_BOUNDED = {"memory_mb": ("max_memory_mb",)}


def _check_guest(constraint: Constraint, document: dict[str, Any], config: dict[str, Any]) -> None:
    if config.get("size") not in (None, ""):
        # A size preset (`performance-16x`) sets the guest upstream, out of the constraint's sight.
        raise Forbidden(f"field 'config.size' ({config['size']!r}) names a machine size preset that constraint "
                        f"'{constraint.name}' cannot judge; give the size in config.guest instead")
    # A machine's guest, or a volume's compute (Volumes_create): the same shape, the same bounds.
    for where, guest in (("config.guest", config.get("guest")), ("compute", document.get("compute"))):
        if guest is None:
            continue
        if not isinstance(guest, dict):
            raise BadRequest(f"field '{where}' must be an object")
        for key, limit in constraint.max_guest:
            for field_name in (key, *_ALSO_BOUNDED.get(key, ())):
                value = guest.get(field_name)
                if value is None:
                    continue
                if isinstance(value, bool) or not isinstance(value, int) or value > limit:
                    raise Forbidden(f"field '{where}.{field_name}' ({value!r}) is over the maximum {limit} of "
                                    f"constraint '{constraint.name}'")


def _check_command(constraint: Constraint, document: dict[str, Any]) -> None:
    assert constraint.commands is not None
    if document.get("command") is not None and document.get("cmd") is not None:
        raise BadRequest("exec gives both 'command' and 'cmd'; the upstream runs only one of them, so send "
                         "'command' alone")
    if document.get("stdin") not in (None, ""):
        # Input changes what an allowed command does (a shell or a client reading from stdin).
        raise Forbidden(f"field 'stdin' cannot be judged by constraint '{constraint.name}', which allows commands, "
                        "not their input; send the command without stdin")
    if "command" in document:
        argv, field_name = document["command"], "command"
        if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
            raise BadRequest("field 'command' must be a list of strings")
    elif "cmd" in document:
        field_name = "cmd"
        if not isinstance(document["cmd"], str):
            raise BadRequest("field 'cmd' must be a string")
        try:
            argv = shlex.split(document["cmd"])
        except ValueError:
            raise BadRequest("field 'cmd' cannot be split into arguments") from None
    else:
        raise Forbidden(f"exec needs field 'command' naming an allowed command (constraint '{constraint.name}')")
    for allowed in constraint.commands:
        if len(allowed) == len(argv) and all(fnmatchcase(a, p) for a, p in zip(argv, allowed, strict=True)):
            return
    raise Forbidden(f"field '{field_name}' ({shlex.join(argv)!r}) is not an allowed command by constraint "
                    f"'{constraint.name}'")


async def _check_volumes(constraint: Constraint, document: dict[str, Any], config: dict[str, Any], app: str,
                         ownership: VolumeOwnership) -> None:
    volumes: list[tuple[str, Any]] = []
    mounts = config.get("mounts") or []
    if not isinstance(mounts, list):
        raise BadRequest("field 'config.mounts' must be a list")
    for index, mount in enumerate(mounts):
        if not isinstance(mount, dict):
            raise BadRequest(f"field 'config.mounts[{index}]' must be an object")
        if mount.get("volume") is not None:
            volumes.append((f"config.mounts[{index}].volume", mount["volume"]))
    if document.get("source_volume_id") is not None:
        volumes.append(("source_volume_id", document["source_volume_id"]))
    for field_name, volume in volumes:
        if not isinstance(volume, str) or not volume or not await ownership.volume(app, volume):
            raise Forbidden(f"field '{field_name}' ({volume!r}) is not a volume of app {app} "
                            f"(constraint '{constraint.name}')")
    snapshot = document.get("snapshot_id")
    if snapshot is not None and (not isinstance(snapshot, str) or not await ownership.snapshot(app, snapshot)):
        raise Forbidden(f"field 'snapshot_id' ({snapshot!r}) is not a snapshot of a volume of app {app} "
                        f"(constraint '{constraint.name}')")
