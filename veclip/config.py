"""Config plumbing shared by every stage: a config file and ``--set key=value`` overrides
applied to nested frozen dataclasses, with values coerced to each field's type; and
each field's documentation (its attribute docstring), so ``veclip config show`` and the flags' help print it."""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import json
import re
import textwrap
import types
import typing
import warnings
from pathlib import Path

from veclip.schema import ColumnMap


def _coerce(value, hint):
    """Turn a CLI string or a JSON value into the field's type."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value in (None, "None", "null", ""):
            return None
        return _coerce(value, args[0])
    if origin is typing.Literal:
        if value not in typing.get_args(hint):
            raise ValueError(f"expected one of {', '.join(map(str, typing.get_args(hint)))}, got {value!r}")
        return value
    if dataclasses.is_dataclass(hint):
        if isinstance(hint, type) and hint is ColumnMap and isinstance(value, str):
            return ColumnMap.parse(value)
        return _merge(hint(), value) if isinstance(value, dict) else value
    if hint is bool:
        if isinstance(value, str):
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(f"expected a boolean, got {value!r}")
            return value.lower() in ("true", "1", "yes")
        return bool(value)
    if hint in (int, float, str):
        return hint(value)
    if origin is tuple:
        return (
            tuple(json.loads(value))
            if isinstance(value, str) and value.startswith("[")
            else tuple(value if isinstance(value, (list, tuple)) else [value])
        )
    if hint is dict or origin is dict:
        return json.loads(value) if isinstance(value, str) else dict(value)
    return value


# Config fields renamed to match their flags (--input, --output): the old names still read, with a note.
RENAMED_FIELDS = {"data": "input", "out": "output"}


def _merge(obj, values: dict):
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    changes = {}
    for key, value in values.items():
        if key not in names and RENAMED_FIELDS.get(key) in names:
            warnings.warn(
                f"config field {key!r} of {type(obj).__name__} is now {RENAMED_FIELDS[key]!r} "
                f"(as its flag, --{RENAMED_FIELDS[key]}); the old name still works",
                FutureWarning,
                stacklevel=2,
            )
            key = RENAMED_FIELDS[key]
        if key not in names:
            raise ValueError(f"unknown config field {key!r} in {type(obj).__name__}; fields: {sorted(names)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            changes[key] = _merge(current, value)
        else:
            changes[key] = _coerce(value, hints[key])
    return dataclasses.replace(obj, **changes)


def _nest(pairs) -> dict:
    """``[(dotted.key, value)]`` -> nested dicts (None values: not given)."""
    nested: dict = {}
    for key, value in pairs:
        if value is not None:
            *parents, leaf = key.strip().split(".")
            cursor = nested
            for part in parents:
                cursor = cursor.setdefault(part, {})
            cursor[leaf] = value
    return nested


def _split_override(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep:
        raise ValueError(f"bad --set {item!r}: expected key=value, e.g. fuser.pool.max_actors=4")
    return key, value


def apply_overrides(config, overrides: list[str], fields: dict | None = None):
    """Apply ``dotted.key=value`` strings, e.g. ``fuser.sampling.temperature=0.5``, and ``fields``
    (dotted keys, None: not given), all at once: a caption mode and the weights it
    needs may come from separate flags."""
    pairs = [_split_override(item) for item in overrides]
    try:
        return _merge(config, _nest([*(fields or {}).items(), *pairs]))
    except (TypeError, ValueError) as err:
        for item, pair in zip(overrides, pairs):  # name the --set at fault where one alone fails
            try:
                _merge(config, _nest([pair]))
            except (TypeError, ValueError) as alone:
                raise ValueError(f"bad --set {item!r}: {alone}") from None
        raise ValueError(str(err)) from None


def load_config_file(config, path: str):
    """Merge a JSON (or YAML) file of nested fields into ``config``."""
    text = Path(path).read_text()
    if path.endswith((".yaml", ".yml")):
        import yaml

        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    return _merge(config, data or {})


def load_named_json(name_or_path: str, package: str, folder: str, what: str) -> dict:
    """A user's JSON file by path, or one shipped in ``package/folder`` by name (prompts, templates)."""
    from importlib import resources

    path = Path(name_or_path)
    if path.suffix == ".json" and path.exists():
        return json.loads(path.read_text())
    shipped = resources.files(package) / folder
    if not (shipped / f"{name_or_path}.json").is_file():
        available = sorted(p.name[:-5] for p in shipped.iterdir() if p.name.endswith(".json"))
        raise FileNotFoundError(f"no {what} {name_or_path!r}: pass a .json path or one of {available}")
    return json.loads((shipped / f"{name_or_path}.json").read_text())


def build(base, config_file: str | None = None, fields: dict | None = None, overrides=()):
    """A preset, then a config file, then fields from flags (None: not given; dotted keys reach
    into nested configs: captions.mode), then ``--set`` overrides."""
    config = load_config_file(base, config_file) if config_file else base
    return apply_overrides(config, list(overrides), fields)


@functools.lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """Each field's documentation: the docstring under it (an attribute docstring, as Sphinx and IDEs read)."""
    try:
        body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    except (OSError, TypeError):
        return {}
    return {
        field.target.id: " ".join(doc.value.value.split())
        for field, doc in zip(body, body[1:])
        if isinstance(field, ast.AnnAssign)
        and isinstance(field.target, ast.Name)
        and isinstance(doc, ast.Expr)
        and isinstance(doc.value, ast.Constant)
        and isinstance(doc.value.value, str)
    }


def describe(config, prefix: str = "") -> list[tuple[str, object, str]]:
    """``(dotted key, value, doc)`` of every leaf field of a (nested) config dataclass."""
    out = []
    docs = field_docs(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        key = prefix + f.name
        if dataclasses.is_dataclass(value) and not isinstance(value, ColumnMap):
            out += describe(value, key + ".")
        else:
            out.append((key, value, docs.get(f.name, "")))
    return out


# Names of settings that hold secrets (an engine's HF_TOKEN, a key for a hub or a bucket, a database URL).
# Whole words of a name, camelCase split into words: HF_TOKEN, AWS_SECRET_ACCESS_KEY, GITHUB_PAT, OPENAI_KEY,
# DATABASE_URL, APP_SECRETS, SECRET_KEY and apiKey match; prompt_tokens and max_tokens do not.
_SECRET_WORDS = re.compile(
    r"(^|_)(TOKEN|SECRETS?|PASSWORD|PASSWD|PWD|CREDENTIALS?|API_?KEY|ACCESS_?KEY|PRIVATE_?KEY|SECRET_?KEY|PAT|"
    r"AUTH|AUTHORIZATION|COOKIE|DSN|DATABASE_URL|CONNECTION_STRING|WEBHOOK(_URL)?)(_|$)",
    re.IGNORECASE,
)
# An environment variable's name (upper case) holding one of these anywhere: PGPASSWORD, MYSQL_PWD, SECRETKEY
_SECRET_INSIDE_ENV_NAME = re.compile(r"PASSWORD|PASSWD|SECRET|WEBHOOK|PRIVATEKEY|CREDENTIAL|APIKEY")
# Credentials inside a URL: scheme://user:password@host
URL_CREDENTIALS = re.compile(r"(?<=://)[^/\s@]+(?=@)")  # a URL's userinfo: user:password, or a bare token
# Values that are secrets by their shape, whatever they are called: a Hugging Face token, an AWS access key id,
# GitHub and Slack tokens, an OpenAI-style key, a PEM private key
TOKEN_SHAPES = re.compile(
    r"\bhf_[A-Za-z0-9]{20,}|\b(AKIA|ASIA)[0-9A-Z]{16}\b|\bgh[pousr]_[A-Za-z0-9]{30,}|\bxox[abprs]-[A-Za-z0-9-]{10,}"
    r"|\bsk-[A-Za-z0-9_-]{20,}|-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(-----END [A-Z ]*PRIVATE KEY-----|\Z)",
    re.DOTALL,
)
REDACTED = "<redacted>"


class _SecretName:
    """``SECRET_NAME.search(name)``: whether a setting's name says it holds a secret."""

    @staticmethod
    def search(name: str):
        if name.isupper() and name.endswith("_KEY"):  # an environment variable: OPENAI_KEY (a field: sort_key is not)
            return re.search("_KEY$", name)
        if name.isupper() and (found := _SECRET_INSIDE_ENV_NAME.search(name)):
            return found
        words = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name)  # apiKey -> api_Key
        return _SECRET_WORDS.search(words)


SECRET_NAME = _SecretName()


def secret_values(data) -> set[str]:
    """String values under secret-looking names anywhere in ``data`` (JSON-like), and secrets by their shape
    (a token, a key id, a private key) under any name."""
    found: set[str] = set()
    if isinstance(data, dict):
        for key, value in data.items():
            if isinstance(value, str) and SECRET_NAME.search(str(key)) and len(value) >= 4:
                found.add(value)
            found |= secret_values(value)
    elif isinstance(data, (list, tuple)):
        for item in data:
            found |= secret_values(item)
    elif isinstance(data, str):
        found |= {m.group(0) for m in TOKEN_SHAPES.finditer(data)}
    return found


def scrub(text: str, secrets) -> str:
    """``text`` with every one of ``secrets``, any credentials inside a URL and anything shaped like a token or
    a private key replaced."""
    for secret in secrets:
        text = text.replace(secret, REDACTED)
    return TOKEN_SHAPES.sub(REDACTED, URL_CREDENTIALS.sub(REDACTED, text))


def redact(data, secrets=frozenset()):
    """``data`` (JSON-like) fit to write where others read it (summaries, markers, logs):
    values under secret-looking names are replaced, and so is every other
    occurrence of those values or of ``secrets`` (an error message that quotes a token)."""
    secrets = set(secrets) | secret_values(data)

    def walk(node, key=""):
        if isinstance(node, dict):
            return {k: walk(v, str(k)) for k, v in node.items()}
        if isinstance(node, (list, tuple)):
            return [walk(item) for item in node]
        if isinstance(node, str):
            return REDACTED if node and SECRET_NAME.search(key) else scrub(node, secrets)
        return node

    return walk(data)


def to_dict(config) -> dict:
    """A stage's config as its run summary records it (a column mapping as it is typed: ``image=jpg,...``)."""
    data = dataclasses.asdict(config)
    if hasattr(config, "columns"):
        data["columns"] = str(config.columns)
    return data
