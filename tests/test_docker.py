"""The docker/ folder: the compose file, the two Dockerfiles, their dockerignore and .env.example.

No Docker engine runs here or on CI, so these tests read the files: the compose file against the
Compose specification's JSON schema (the copy check-jsonschema ships), then what a user relies on
that no schema says: health checks, secrets only from the env file, ports on 127.0.0.1, the GPU
reservation, images whose Python and Ray agree, and commands that exist in the images and parse
with the installed evomerge and Ray command lines.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from importlib import metadata, resources
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
ENV_EXAMPLE = DOCKER / ".env.example"
DOCKERFILES = {"gpu": DOCKER / "Dockerfile.gpu", "cpu": DOCKER / "Dockerfile.cpu"}
SECRET_NAME = re.compile(r"PASSWORD|TOKEN|SECRET|PASSPHRASE|API_?KEY", re.IGNORECASE)


# --- Compose variable interpolation (the subset of the Compose specification that we use) ------

_VARIABLE = re.compile(r"\$(?:(?P<escaped>\$)|\{(?P<braced>[^}]*)\}|(?P<named>[A-Za-z_]\w*))")
_BRACED = re.compile(r"(?P<name>[A-Za-z_]\w*)(?:(?P<op>:?[-?+])(?P<arg>.*))?", re.DOTALL)


class MissingVariable(Exception):
    pass


def _references(text: str) -> Iterator[tuple[str, str | None, str | None]]:
    """(name, operator, argument) of every variable reference; ``$$`` is an escaped dollar."""
    for match in _VARIABLE.finditer(text):
        if match["named"]:
            yield match["named"], None, None
        elif match["braced"] is not None:
            inner = _BRACED.fullmatch(match["braced"])
            assert inner, f"not a variable reference: ${{{match['braced']}}}"
            yield inner["name"], inner["op"], inner["arg"]


def interpolate(text: str, env: dict[str, str]) -> str:
    def substitute(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        if match["named"]:
            return env.get(match["named"], "")
        inner = _BRACED.fullmatch(match["braced"])
        assert inner, f"not a variable reference: ${{{match['braced']}}}"
        name, op, arg = inner["name"], inner["op"], inner["arg"]
        value = env.get(name)
        if op is None:
            return value or ""
        present = bool(value) if op.startswith(":") else value is not None
        if op.endswith("-"):
            return value if present else arg
        if op.endswith("?"):
            if not present:
                raise MissingVariable(f"{name}: {arg}")
            return value
        return arg if present else ""

    return _VARIABLE.sub(substitute, text)


def interpolated(node: Any, env: dict[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [interpolated(item, env) for item in node]
    if isinstance(node, dict):
        return {key: interpolated(value, env) for key, value in node.items()}
    return node


def strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, list):
        for item in node:
            yield from strings(item)
    elif isinstance(node, dict):
        for value in node.values():
            yield from strings(value)


# --- The files ----------------------------------------------------------------------------------


@cache
def compose_text() -> str:
    return COMPOSE.read_text()


@cache
def raw_compose() -> dict[str, Any]:
    return yaml.safe_load(compose_text())


@cache
def env_example() -> dict[str, str]:
    values: dict[str, str] = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, sep, value = line.partition("=")
            assert sep and re.fullmatch(r"[A-Za-z_]\w*", name), f".env.example: bad line {line!r}"
            assert name not in values, f".env.example: {name} twice"
            values[name] = value
    return values


def example_env() -> dict[str, str]:
    """.env.example as a user fills it in: each empty (required) value given a stand-in."""
    return {
        name: value or f"/srv/stand-in-for-{name.lower()}" for name, value in env_example().items()
    }


@cache
def compose() -> dict[str, Any]:
    """The compose file as Compose sees it with the example settings."""
    return interpolated(raw_compose(), example_env())


def services() -> dict[str, dict[str, Any]]:
    return compose()["services"]


def argv(command: str | list[str]) -> list[str]:
    return shlex.split(command) if isinstance(command, str) else [str(part) for part in command]


def option(args: list[str], name: str) -> str | None:
    """The value of ``--name=value`` or ``--name value`` in an argument list."""
    for index, arg in enumerate(args):
        if arg == name and index + 1 < len(args):
            return args[index + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def volume_parts(volume: str) -> list[str]:
    """SOURCE:TARGET[:OPTIONS] of a short-syntax volume, colons inside ${...} kept."""
    return re.findall(r"(?:\$\{[^}]*\}|[^:])+", volume)


def healthcheck_argv(service: dict[str, Any]) -> list[str]:
    test = service["healthcheck"]["test"]
    parts = argv(test)
    assert parts[0] in ("CMD", "CMD-SHELL"), f"healthcheck test must start with CMD: {parts}"
    return parts[1:] if parts[0] == "CMD" else ["sh", "-c", *parts[1:]]


# --- A small Dockerfile reader ------------------------------------------------------------------


@dataclass(eq=False)
class Dockerfile:
    path: Path
    instructions: list[tuple[str, str]] = field(default_factory=list)
    args: dict[str, str] = field(default_factory=dict)
    """Every ARG's default, global and per stage (the two never disagree here)."""

    @classmethod
    def read(cls, path: Path) -> Dockerfile:
        parsed = cls(path)
        pending = ""
        for line in path.read_text().splitlines():
            stripped = line.strip()
            if not stripped or stripped.startswith("#"):
                continue  # comments, parser directives, and comment lines inside a continuation
            if stripped.endswith("\\"):
                pending += stripped[:-1] + " "
                continue
            keyword, _, rest = (pending + stripped).partition(" ")
            pending = ""
            parsed.instructions.append((keyword.upper(), rest.strip()))
        assert not pending, f"{path.name}: ends inside a line continuation"
        for keyword, rest in parsed.instructions:
            name, has_default, default = rest.partition("=")
            if keyword == "ARG" and (has_default or name not in parsed.args):
                parsed.args[name] = default.strip('"')  # a bare ARG in a stage keeps the global
        return parsed

    def expand(self, text: str) -> str:
        return interpolate(text, self.args)

    def of(self, keyword: str) -> list[str]:
        return [rest for key, rest in self.instructions if key == keyword]

    def stages(self) -> list[list[tuple[str, str]]]:
        result: list[list[tuple[str, str]]] = []
        for instruction in self.instructions:
            if instruction[0] == "FROM":
                result.append([])
            if result:
                result[-1].append(instruction)
        return result

    def env(self) -> dict[str, str]:
        values: dict[str, str] = {}
        for rest in self.of("ENV"):
            for pair in shlex.split(rest):
                name, sep, value = pair.partition("=")
                assert sep, f"{self.path.name}: use ENV NAME=value, got {rest!r}"
                values[name] = value
        return values

    def pip_installs(self) -> list[tuple[int, list[str]]]:
        """(instruction index, arguments) of each ``pip install`` in a RUN, ARGs expanded."""
        found = []
        for index, (keyword, rest) in enumerate(self.instructions):
            if keyword != "RUN":
                continue
            for command in re.split(r"&&|;", rest):
                words = shlex.split(self.expand(command))
                if words[:2] == ["pip", "install"] or words[1:3] == ["-m", "pip"]:
                    found.append((index, words[words.index("install") + 1 :]))
        return found

    def copies(self) -> list[tuple[str, PurePosixPath]]:
        """(source, where it lands) of each file or folder the final stage copies from the build
        context: a folder's contents go into the destination, a file into a destination folder
        (several sources, or a destination ending in /) or onto the destination."""
        result = []
        workdir = PurePosixPath("/")
        for keyword, rest in self.stages()[-1]:
            if keyword == "WORKDIR":
                workdir = workdir / self.expand(rest)
            if keyword != "COPY":
                continue
            words = json.loads(rest) if rest.startswith("[") else shlex.split(rest)
            if any(word.startswith("--from=") for word in words):
                continue
            *sources, target = [self.expand(w) for w in words if not w.startswith("--")]
            destination = workdir / target
            into_folder = len(sources) > 1 or target.endswith("/") or target in (".", "./")
            for source in sources:
                is_file = (ROOT / source).is_file()
                landing = (
                    destination / Path(source).name if is_file and into_folder else destination
                )
                result.append((source.rstrip("/"), landing))
        return result


@cache
def dockerfile(kind: str) -> Dockerfile:
    return Dockerfile.read(DOCKERFILES[kind])


def requirement_name(spec: str) -> str:
    return re.split(r"[\[<>=!~;\s]", spec, maxsplit=1)[0].lower().replace("_", "-")


def package_root(parsed: Dockerfile) -> str:
    """Where the image installs evomerge from (``pip install -e DIR``)."""
    for _, args in parsed.pip_installs():
        if "-e" in args:
            return args[args.index("-e") + 1]
    raise AssertionError(f"{parsed.path.name}: evomerge is not installed with pip install -e DIR")


# --- .dockerignore matching (Docker's rules: last match wins, a match on a parent counts) ------


def _ignore_regex(pattern: str) -> re.Pattern[str]:
    text, out, i = pattern.strip("/"), "", 0
    while i < len(text):
        if text.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif text.startswith("**", i):
            out, i = out + ".*", i + 2
        elif text[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif text[i] == "?":
            out, i = out + "[^/]", i + 1
        elif text[i] == "[":
            end = text.index("]", i)
            out, i = out + text[i : end + 1], end + 1
        else:
            out, i = out + re.escape(text[i]), i + 1
    return re.compile(out + r"\Z")


def ignore_rules(path: Path) -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            negated = line.startswith("!")
            rules.append((negated, _ignore_regex(line.lstrip("!"))))
    return rules


def ignored(rules: list[tuple[bool, re.Pattern[str]]], relative: str) -> bool:
    parts = relative.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    result = False
    for negated, regex in rules:
        if any(regex.match(prefix) for prefix in prefixes):
            result = not negated
    return result


def tracked_files(source: str) -> list[str]:
    """The repository's files under ``source`` (git's list; without git, all but caches)."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--", source],
            cwd=ROOT,
            capture_output=True,
            check=True,
            timeout=30,
        ).stdout.decode()
        return [name for name in listed.split("\0") if name]
    except (OSError, subprocess.SubprocessError):
        path = ROOT / source
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        names = [file.relative_to(ROOT).as_posix() for file in files]
        return [name for name in names if "__pycache__" not in name]


# --- The compose file ---------------------------------------------------------------------------


@cache
def _compose_validator():
    jsonschema = pytest.importorskip("jsonschema")
    pytest.importorskip("check_jsonschema", reason="check-jsonschema ships the Compose schema")
    vendor = resources.files("check_jsonschema.builtin_schemas.vendor")
    schema = json.loads(vendor.joinpath("compose-spec.json").read_text())
    assert "services" in schema["properties"], "not the Compose specification's schema"
    return jsonschema.Draft202012Validator(schema)


def test_compose_file_follows_the_compose_specification():
    validator = _compose_validator()
    for label, document in (("as written", raw_compose()), ("interpolated", compose())):
        errors = [
            f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validator.iter_errors(document)
        ]
        assert not errors, f"compose.yaml ({label}) breaks the Compose schema:\n" + "\n".join(
            errors
        )


def test_schema_validation_really_rejects_mistakes():
    validator = _compose_validator()
    broken = copy.deepcopy(compose())
    broken["services"]["postgres"]["healthcheck"]["intervall"] = "10s"
    broken["services"]["ray-head"]["depends_on"] = {"postgres": {"condition": "healthy"}}
    assert len(list(validator.iter_errors(broken))) >= 2


def test_every_service_has_a_healthcheck_and_a_pinned_image():
    for name, service in services().items():
        check = service.get("healthcheck")
        assert check and not check.get("disable"), f"{name}: no healthcheck"
        assert healthcheck_argv(service), f"{name}: empty healthcheck"
        for key in ("interval", "timeout", "retries"):
            assert key in check, f"{name}: healthcheck without {key}"
        image = service["image"]
        assert re.fullmatch(r"[\w./-]+:[\w.-]+", image), f"{name}: image {image!r} has no tag"
        assert not image.endswith(":latest"), f"{name}: image {image!r} is not pinned"
        assert service.get("restart") in ("unless-stopped", "always", "on-failure"), name


def test_dependencies_wait_until_healthy():
    all_services = services()
    assert any("depends_on" in s for s in all_services.values())
    for name, service in all_services.items():
        depends_on = service.get("depends_on", {})
        assert isinstance(depends_on, dict), f"{name}: depends_on needs the long form (condition)"
        for other, spec in depends_on.items():
            assert other in all_services, f"{name} depends on unknown service {other}"
            assert spec.get("condition") == "service_healthy", f"{name} -> {other}: not healthy"
            assert "healthcheck" in all_services[other], f"{other} has no healthcheck to wait on"
    assert services()["ray-worker"]["depends_on"].keys() == {"ray-head"}
    assert "postgres" in services()["dashboard"]["depends_on"]


def test_postgres_keeps_its_data_on_a_named_volume():
    postgres = services()["postgres"]
    major = int(re.match(r"postgres:(\d+)", postgres["image"])[1])
    # The official image moved its data directory in PostgreSQL 18: a volume on the old path
    # would leave the data inside the container, lost on the next `up`.
    data_dir = "/var/lib/postgresql/data" if major < 18 else "/var/lib/postgresql"
    named = compose().get("volumes") or {}
    mounts = [volume_parts(volume) for volume in postgres["volumes"]]
    assert any(target == data_dir and source in named for source, target, *_ in mounts), (
        f"postgres: {data_dir} is not on a named volume ({postgres['volumes']})"
    )
    for name, service in services().items():
        for volume in service.get("volumes", []):
            source = volume_parts(volume)[0]
            assert source.startswith("/") or source in named, f"{name}: undeclared volume {source}"


def test_secrets_come_only_from_the_env_file():
    raw = raw_compose()
    secret_values = []
    for name, service in raw["services"].items():
        environment = service.get("environment", {})
        assert isinstance(environment, dict), f"{name}: use the mapping form of environment"
        for key, value in environment.items():
            if SECRET_NAME.search(key):
                secret_values.append(value)
                refs = list(_references(str(value)))
                assert re.fullmatch(r"\$\{\w+:\?[^}]*\}", str(value)) and refs, (
                    f"{name}: {key} must be exactly ${{VAR:?message}} (required), got {value!r}"
                )
    assert len(secret_values) >= 4, "postgres, ray-head, ray-worker and dashboard take secrets"
    for text in strings(compose()):
        assert not re.search(r"://[^/@\s]*:[^/@\s]*@", text), f"a password in a URL: {text}"
        for secret in ("stand-in-for-postgres_password", "stand-in-for-ray_auth_token"):
            if secret in text:
                assert text == f"/srv/{secret}", f"a secret inside a longer value: {text}"
    for name, value in env_example().items():
        if SECRET_NAME.search(name):
            assert value == "", f".env.example gives {name} a value: leave secrets empty"


def test_env_example_documents_exactly_the_variables_compose_reads():
    referenced: dict[str, set[str | None]] = {}
    for name, op, _ in _references(compose_text()):
        referenced.setdefault(name, set()).add(op)
    documented = env_example()
    assert referenced.keys() == documented.keys(), (
        f"read by compose.yaml only: {sorted(referenced.keys() - documented.keys())}; "
        f"in .env.example only: {sorted(documented.keys() - referenced.keys())}"
    )
    lines = ENV_EXAMPLE.read_text().splitlines()
    for index, line in enumerate(lines):
        if line and not line.startswith("#"):
            assert index and lines[index - 1].startswith("#"), f"{line}: no comment above it"
    for name, ops in referenced.items():
        assert len(ops) == 1, f"{name} is read in different ways: {ops}"
        (op,) = ops
        required = op in (":?", "?")
        assert required == (documented[name] == ""), (
            f"{name}: empty in .env.example exactly when compose.yaml requires it (${{{name}:?}})"
        )
    for name, op, default in _references(compose_text()):
        if op == ":-":
            example = documented[name]
            assert example == default, f"{name}: .env.example {example!r}, compose.yaml {default!r}"
    with pytest.raises(MissingVariable, match="POSTGRES_PASSWORD"):
        interpolated(raw_compose(), {**example_env(), "POSTGRES_PASSWORD": ""})
    gitignore = (DOCKER / ".gitignore").read_text().split()
    assert "/.env" in gitignore or ".env" in gitignore, "docker/.gitignore must ignore .env"


def test_published_ports_are_on_localhost_and_match_the_commands():
    published = 0
    for name, service in services().items():
        for port in service.get("ports", []):
            published += 1
            if isinstance(port, dict):
                host_ip, container = port.get("host_ip"), str(port["target"])
            else:
                host_ip, _, container = str(port).rpartition(":")
                host_ip = host_ip.rpartition(":")[0]
            assert host_ip == "127.0.0.1", f"{name}: port {port} is not bound to 127.0.0.1"
            args = argv(service["command"])
            listens = {option(args, "--port"), option(args, "--dashboard-port")}
            assert container in listens, f"{name}: publishes {container}, listens on {listens}"
    assert published >= 2, "the Ray dashboard and optuna-dashboard are published"
    assert "ports" not in services()["postgres"], "the database is not published"


def test_gpu_worker_reserves_nvidia_gpus_and_is_not_replicated():
    worker = services()["ray-worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    for device in devices:
        count = str(device.get("count", ""))
        assert count == "all" or count.isdigit(), f"GPU count {count!r}"
    # A reservation by count gives every replica the *first* GPUs (Docker numbers them from
    # 0 each time): replicas would share GPU 0. One container holds the GPUs; Ray splits them.
    assert int(worker.get("deploy", {}).get("replicas", 1)) == 1
    assert "scale" not in worker
    head = argv(services()["ray-head"]["command"])
    assert option(head, "--num-gpus") == "0", "the head must not take GPU work"
    assert "deploy" not in services()["ray-head"]


def test_ray_nodes_share_one_token_and_address():
    head, worker = services()["ray-head"], services()["ray-worker"]
    head_args, worker_args = argv(head["command"]), argv(worker["command"])
    address = f"ray-head:{option(head_args, '--port')}"
    assert option(worker_args, "--address") == address
    for service in (head, worker):
        env = service["environment"]
        assert env["RAY_AUTH_MODE"] == "token"
        assert env["RAY_ADDRESS"] == address, "drivers in the containers must join this cluster"
        assert env["RAY_AUTH_TOKEN"] == example_env()["RAY_AUTH_TOKEN"]
        assert int(re.fullmatch(r"(\d+)[gG][bB]?", str(service["shm_size"]))[1]) >= 1


def test_data_mounts():
    def mounts(name: str) -> dict[str, str]:
        return {
            target: ",".join(options)
            for _, target, *options in map(volume_parts, services()[name]["volumes"])
        }

    head, worker = mounts("ray-head"), mounts("ray-worker")
    assert worker["/models"] == "ro" and head["/models"] == "ro", "models are read-only"
    assert worker["/studies"] == "ro", "workers read the studies' evaluator files"
    assert "/exports" in head and "/exports" not in worker
    for volume in raw_compose()["services"]["ray-head"]["volumes"]:
        source = volume_parts(volume)[0]
        if source.startswith("$"):
            (reference,) = _references(source)
            assert reference[1] == ":?", f"{volume}: the host folder must be required"


def test_builds_point_at_files_that_exist():
    built: dict[str, Path] = {}
    for name, service in services().items():
        build = service.get("build")
        if build is None:
            continue
        context = (DOCKER / build["context"]).resolve()
        assert context == ROOT, f"{name}: the build context is the repository root"
        file = context / build["dockerfile"]
        assert file.is_file(), f"{name}: no {file}"
        assert file.with_name(file.name + ".dockerignore").is_file(), f"{name}: no dockerignore"
        args = dockerfile(file.name.split(".")[-1]).args
        for arg in build.get("args", {}):
            assert arg in args, f"{name}: build arg {arg} is not an ARG of {file.name}"
        built[service["image"]] = file
    assert set(built.values()) == set(DOCKERFILES.values())
    for name, service in services().items():
        if service["image"].startswith("evomerge:"):
            assert service["image"] in built, f"{name}: nothing builds {service['image']}"
    assert services()["ray-head"]["image"] == services()["ray-worker"]["image"]


# --- The Dockerfiles ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_base_images_are_pinned(kind):
    parsed = dockerfile(kind)
    names = set()
    for rest in parsed.of("FROM"):
        words = parsed.expand(rest).split()
        image = next(w for w in words if not w.startswith("--"))
        if "AS" in (w.upper() for w in words):
            names.add(words[-1])
        if image in names:
            continue
        assert "$" not in image and ":" in image, f"{kind}: FROM {image} has no tag"
        tag = image.rsplit(":", 1)[1]
        assert tag != "latest" and re.search(r"\d+\.\d+", tag), f"{kind}: {image} is not pinned"


def test_gpu_base_and_torch_build_use_the_same_cuda():
    parsed = dockerfile("gpu")
    base = parsed.args["CUDA_IMAGE"]
    match = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-runtime-ubuntu\d+\.\d+", base)
    assert match, f"the GPU base must be a pinned nvidia/cuda runtime image, got {base}"
    assert parsed.args["TORCH_INDEX_URL"].endswith(f"/cu{match[1]}{match[2]}")
    assert dockerfile("cpu").args["TORCH_INDEX_URL"].endswith("/cpu")
    assert parsed.env()["NVIDIA_DRIVER_CAPABILITIES"].split(",") == ["compute", "utility"]


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_torch_is_installed_before_the_package(kind):
    parsed = dockerfile(kind)
    installs = parsed.pip_installs()
    torch = [
        (index, args)
        for index, args in installs
        if any(requirement_name(a) == "torch" for a in args if not a.startswith("-"))
    ]
    assert len(torch) == 1, f"{kind}: torch installed {len(torch)} times"
    torch_index, torch_args = torch[0]
    assert option(torch_args, "--index-url") == parsed.args["TORCH_INDEX_URL"]
    assert any(a == f"torch=={parsed.args['TORCH_VERSION']}" for a in torch_args)
    root = package_root(parsed)
    (package_index, package_args) = next((i, a) for i, a in installs if root in a)
    assert torch_index < package_index, f"{kind}: the package is installed before torch"
    for flag in ("--index-url", "-U", "--upgrade", "--force-reinstall", "--extra-index-url"):
        assert flag not in package_args, f"{kind}: {flag} on the package's install may swap torch"


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_containers_do_not_run_as_root(kind):
    final_stage = dockerfile(kind).stages()[-1]
    users = [rest for keyword, rest in final_stage if keyword == "USER"]
    assert users, f"{kind}: no USER in the final stage"
    assert users[-1].split(":")[0] not in ("root", "0"), f"{kind}: runs as {users[-1]}"
    created = " ".join(rest for keyword, rest in final_stage if keyword == "RUN")
    assert "useradd" in created and users[-1] in created, f"{kind}: USER {users[-1]} not created"


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_copied_files_exist_and_pass_the_dockerignore(kind):
    parsed = dockerfile(kind)
    rules = ignore_rules(DOCKERFILES[kind].with_name(DOCKERFILES[kind].name + ".dockerignore"))
    copied = 0
    for source, _ in parsed.copies():
        path = ROOT / source
        assert path.exists(), f"{kind}: COPY {source}: no such file in the repository"
        assert not ignored(rules, source), f"{kind}: COPY {source} is excluded by dockerignore"
        for relative in tracked_files(source):
            copied += 1
            assert not ignored(rules, relative), f"{kind}: {relative} left out of the image"
    assert copied > 20
    for local in (
        ".venv/bin/python",
        ".git/HEAD",
        "demo_output/best/model.safetensors",
        "evomerge_studies.db",
        "studies/evomerge_studies.db-wal",
        "evaluators/toy_facts/scratch.db",
        "search_spaces/evomerge_studies.db-shm",
        "evomerge/.env",
        "evomerge/__pycache__/cli.cpython-311.pyc",
        ".pytest_cache/v/cache/nodeids",
        ".ruff_cache/CACHEDIR.TAG",
        "evomerge.egg-info/PKG-INFO",
        "docker/.env",
        "tests/test_docker.py",
    ):
        assert ignored(rules, local), f"{kind}: {local} would be sent to the builder"


def test_the_two_dockerignore_files_agree():
    gpu, cpu = (p.with_name(p.name + ".dockerignore").read_text() for p in DOCKERFILES.values())
    assert gpu == cpu


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_image_holds_the_package_with_its_data(kind):
    parsed = dockerfile(kind)
    root = PurePosixPath(package_root(parsed))
    landed = dict(parsed.copies())
    # evomerge finds evaluators/ and search_spaces/ beside its own folder, and pip needs the
    # readme that pyproject.toml names: the image keeps the repository's layout under one root.
    for needed in ("pyproject.toml", "README.md", "evomerge", "evaluators", "search_spaces"):
        assert landed.get(needed) == root / needed, (
            f"{kind}: {needed} lands at {landed.get(needed)}, not {root / needed}"
        )
    env = parsed.env()
    assert env["PATH"].startswith(f"{env['VIRTUAL_ENV']}/bin:"), f"{kind}: the venv is not on PATH"
    assert env["RAY_USAGE_STATS_ENABLED"] == "0"
    assert env["HF_HUB_OFFLINE"] == env["HF_DATASETS_OFFLINE"] == "1"


def test_both_images_run_the_same_python_and_ray():
    gpu, cpu = dockerfile("gpu").args, dockerfile("cpu").args
    # Ray refuses a node or driver whose Python differs from the head's, down to the patch.
    for name in ("PYTHON_VERSION", "RAY_VERSION", "TORCH_VERSION"):
        assert gpu[name] == cpu[name], f"{name}: gpu {gpu[name]} != cpu {cpu[name]}"
        assert re.fullmatch(r"\d+\.\d+\.\d+", gpu[name]), f"{name} must be an exact version"
    for kind in DOCKERFILES:
        parsed = dockerfile(kind)
        pins = [a for _, args in parsed.pip_installs() for a in args if a.startswith("ray[")]
        assert pins == [f"ray[default]=={gpu['RAY_VERSION']}"], f"{kind}: Ray pin {pins}"
    base = dockerfile("cpu").expand(dockerfile("cpu").of("FROM")[-1])
    assert base.startswith(f"python:{cpu['PYTHON_VERSION']}-"), base


# --- Commands the compose file runs --------------------------------------------------------------


@cache
def image_commands(parsed: Dockerfile) -> frozenset[str]:
    """Executables on the image's PATH that come from what its pip installs."""
    commands = {"python", "pip"}
    root = package_root(parsed)
    installed = [a for _, args in parsed.pip_installs() for a in args if not a.startswith("-")]
    names = {requirement_name(a) for a in installed if a != root}
    if root in installed:
        evomerge = metadata.distribution("evomerge")
        names |= {requirement_name(r) for r in evomerge.requires or [] if "extra ==" not in r}
        commands |= {e.name for e in evomerge.entry_points if e.group == "console_scripts"}
    for name in names:
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        commands |= {e.name for e in dist.entry_points if e.group == "console_scripts"}
    return frozenset(commands)


def image_of(service: dict[str, Any]) -> str:
    images = {s["image"]: s["build"]["dockerfile"] for s in services().values() if "build" in s}
    return images[service["image"]].rsplit(".", 1)[1]


def our_commands() -> list[tuple[str, str, list[str]]]:
    """(service, what, argv) of every command and health check run in our images."""
    found = []
    for name, service in services().items():
        if service["image"].startswith("evomerge:"):
            found.append((name, "command", argv(service["command"])))
            found.append((name, "healthcheck", healthcheck_argv(service)))
    return found


def test_commands_exist_in_their_images():
    gpu, cpu = image_commands(dockerfile("gpu")), image_commands(dockerfile("cpu"))
    assert {"evomerge", "ray"} <= gpu
    assert gpu <= cpu, f"HEAD_IMAGE may be the CPU image, which lacks {gpu - cpu}"
    for name, what, args in our_commands():
        available = image_commands(dockerfile(image_of(services()[name])))
        assert args[0] in available, f"{name} {what}: {args[0]} is not in the image"
        if args[:2] == ["python", "-c"]:
            compile(args[2], f"{name} {what}", "exec")


def test_evomerge_commands_parse_with_the_cli():
    from evomerge.cli import build_parser

    parser = build_parser()
    evomerge_commands = [
        (f"{n} {w}", args) for n, w, args in our_commands() if args[0] == "evomerge"
    ]
    assert evomerge_commands, "the dashboard runs `evomerge dashboard`"
    for label, args in evomerge_commands:
        try:
            parser.parse_args(args[1:])
        except SystemExit:
            pytest.fail(f"{label}: `{shlex.join(args)}` does not parse")


def test_ray_commands_parse_with_the_installed_ray():
    import click
    from ray.scripts.scripts import cli

    ray_commands = [(f"{n} {w}", args) for n, w, args in our_commands() if args[0] == "ray"]
    assert len(ray_commands) >= 4
    for label, args in ray_commands:
        command = cli.commands.get(args[1])
        assert command is not None, f"{label}: no `ray {args[1]}`"
        try:
            command.make_context(args[1], args[2:])
        except click.ClickException as exc:
            pytest.fail(f"{label}: `{shlex.join(args)}`: {exc.format_message()}")
