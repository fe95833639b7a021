"""Typed settings from YAML: the one loader behind recipes (config.py), scorer configs
(eval/scoring/config.py) and benchmark settings.

    @dataclass
    class Section:
        steps: int = option(10, "optimizer steps")          # help text travels with the field

    tree = read_yaml(path, what="recipe")                   # yaml.safe_load semantics, duplicate keys refused
    cfg = load(Section, tree, overrides, where=str(path))   # dotted KEY=VALUE overrides, types checked

Every mistake is a ConfigError naming the key, where it came from (file, or the command line)
and what is allowed. Nothing in a file is executed: the loader is a SafeLoader subclass.
"""

import dataclasses
import math
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A user mistake in a recipe or an override: the message says which key and why."""


def option(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with its help text (`vipo config keys` prints it)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


# A data file given where a settings file belongs, and the source that reads it.
DATA_SUFFIXES = {".parquet": "pickapic", ".jsonl": "manifest", ".tar": "shards"}
MAX_SETTINGS_BYTES = 1 << 20


class _DuplicateKey(yaml.YAMLError):
    pass


class SafeLoader(yaml.SafeLoader):
    """yaml.safe_load's loader (no tags, nothing executed) that refuses a key given twice in one
    mapping, where safe_load keeps the last one without a word."""

    def construct_document(self, node):
        self._root = node
        return super().construct_document(node)

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first_line: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may be overridden by design
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    earlier = first_line.get(key)
                except TypeError:  # an unhashable key: SafeLoader's own error names it
                    break
                if earlier is not None:
                    raise _DuplicateKey(
                        f"line {line}: key '{self._prefix(node)}{key}' is given twice (first at line {earlier}); "
                        "YAML would keep only the last"
                    )
                first_line[key] = line
        return super().construct_mapping(node, deep)

    def _prefix(self, target: yaml.Node) -> str:
        """'loss.' for the mapping under `loss:`, found from the document's root (errors only)."""
        stack, seen = [(self._root, "")], set()
        while stack:
            node, prefix = stack.pop()
            if node is target:
                return prefix
            if isinstance(node, yaml.MappingNode) and id(node) not in seen:
                seen.add(id(node))
                stack += [(v, f"{prefix}{k.value}.") for k, v in node.value if isinstance(k, yaml.ScalarNode)]
        return ""


def safe_load(text: str) -> Any:
    return yaml.load(text, Loader=SafeLoader)  # noqa: S506 - a SafeLoader subclass


def _yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML error in one line: where, and what (PyYAML's own text spans several)."""
    if isinstance(err, yaml.MarkedYAMLError):
        mark = err.problem_mark or err.context_mark
        what = "; ".join(p for p in (err.context, err.problem) if p)
        if "constructor for the tag" in what:
            what += " (recipes are plain YAML: no tags)"
        return f"not valid YAML at line {mark.line + 1}, column {mark.column + 1}: {what}" if mark else what
    return "not valid YAML: " + " ".join(str(err).split())


def shown(value: Any, limit: int = 80) -> str:
    """repr(value), cut to `limit` characters: a message stays one readable line."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 5]}...{text[-2:]}"


def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if origin in (tuple, list):
        return f"{origin.__name__}[{', '.join(type_name(a) for a in typing.get_args(tp))}]"
    return getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    """`value` as type `tp`, or ConfigError. Strings are accepted for numbers (YAML 1.1 reads
    `1e-8` as a string) but never silently truncated."""

    def bad() -> ConfigError:
        return ConfigError(f"{where}: {key} must be {type_name(tp)}, got {shown(value)}")

    origin = typing.get_origin(tp)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        if isinstance(value, bool):  # YAML 1.1 reads no / off / yes / on as booleans
            for alias in ("yes", "true", "on") if value else ("no", "false", "off"):
                if alias in typing.get_args(tp):
                    return alias
        raise bad()
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, key, where)
            except ConfigError:
                pass
        raise bad()
    if origin in (tuple, list):
        args = typing.get_args(tp)
        if isinstance(value, str):
            try:
                value = safe_load(value) if value.strip().startswith("[") else value.split(",")
            except yaml.YAMLError:
                raise bad() from None
        if not isinstance(value, (list, tuple)):
            raise bad()
        if origin is tuple:
            if len(value) != len(args):
                raise bad()
            return tuple(coerce(v, a, key, where) for v, a in zip(value, args, strict=True))
        return [coerce(v, args[0], key, where) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise bad()
    if tp is int:
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)  # exact, however long
            except ValueError:
                pass
            try:
                number = float(value)
            except ValueError:
                raise bad() from None
            if number.is_integer():
                return int(number)
        raise bad()
    if tp is float:
        if isinstance(value, bool):
            raise bad()
        try:
            number = float(value) if isinstance(value, (int, float, str)) else None
        except ValueError:
            raise bad() from None
        except OverflowError:  # an int past float's range
            number = math.inf
        if number is None:
            raise bad()
        if not math.isfinite(number):
            raise ConfigError(f"{where}: {key} must be a finite float, got {shown(value)}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad()
    raise TypeError(f"config field {key} has an unsupported type {tp!r}")


def field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def build(cls: type, data: Any, prefix: str, where: str) -> Any:
    types_ = field_types(cls)
    if not isinstance(data, dict):
        raise ConfigError(
            f"{where}: {prefix.rstrip('.') or 'the config'} must be a mapping of its keys "
            f"({', '.join(types_)}), got {shown(data)}"
        )
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in types_:
            raise ConfigError(
                f"{where}: unknown key '{dotted}' (allowed in {prefix.rstrip('.') or 'the top level'}: "
                f"{', '.join(types_)})"
            )
        tp = types_[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = build(tp, value if value is not None else {}, f"{dotted}.", where)
        else:
            kwargs[key] = coerce(value, tp, dotted, where)
    return cls(**kwargs)


def set_dotted(tree: dict, key: str, value: Any, where: str) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if child is None:  # `loss:` with nothing under it in the file
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{where}: '{key}' goes below '{part}', which is not a section")
        node = child
    node[parts[-1]] = value


def check_key(root: type, item: str, key: str) -> None:
    """Refuse an override key with an empty part, one below a value, or a whole section of `root`;
    a name the sections lack is left to build(), whose message lists what the section allows."""
    if "" in key.split("."):
        raise ConfigError(
            f"override {item!r}: {key!r} has an empty part; keys are section.key (see `vipo config keys`)"
        )
    section, walked = root, []
    for part in key.split("."):
        if section is None:
            raise ConfigError(f"override {item!r}: {'.'.join(walked)} is a value, not a section")
        types_ = field_types(section)
        if part not in types_:
            return
        walked.append(part)
        section = types_[part] if dataclasses.is_dataclass(types_[part]) else None
    if section is not None and section is not root:
        example = dataclasses.fields(section)[0].name
        raise ConfigError(
            f"override {item!r}: {key} is a section; set its keys one by one (e.g. {key}.{example}=...)"
        )


def parse_overrides(overrides: list[str], root: type | None = None) -> list[tuple[str, Any]]:
    """`["optim.lr=1e-8", "loss.alpha=8"]` -> [("optim.lr", "1e-8"), ("loss.alpha", 8)].
    A key given twice takes its last value, as a later command-line flag does. With `root`, keys
    are checked against its sections."""
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        if root is not None:
            check_key(root, item, key)
        try:
            value = safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        parsed.append((key, value))
    return parsed


def read_yaml(path: Path, *, what: str = "recipe", sections: str = "", hint: str = "") -> dict:
    """The mapping a settings file holds, or a ConfigError naming the file and what is wrong with it.
    `what` names the kind of file in messages; `sections` lists its sections for an empty one;
    `hint` is added when it does not exist."""
    path = Path(path)

    def not_a(why: str) -> ConfigError:
        return ConfigError(f"{path} is not a {what} (YAML): {why}")

    suffix = path.suffix.lower()
    if suffix in DATA_SUFFIXES and path.is_file():
        source = DATA_SUFFIXES[suffix]
        raise not_a(f"{suffix} is data; to read it, give data.source={source} data.path={path}")
    try:
        if path.is_file() and path.stat().st_size > MAX_SETTINGS_BYTES:
            raise not_a(f"{path.stat().st_size} bytes, where a {what} is a few KB of text")
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{what} file not found: {path}{hint}") from None
    except IsADirectoryError:
        raise ConfigError(f"{what} path is a directory, not a YAML file: {path}") from None
    except OSError as err:  # permissions, a file where a folder of the path should be, ...
        raise ConfigError(f"cannot read {what} {path}: {err.strerror or err}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise not_a(f"not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start})") from None
    try:
        tree = safe_load(text)
    except _DuplicateKey as err:
        raise ConfigError(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        raise not_a(_yaml_problem(err)) from None
    if tree is None:
        raise ConfigError(
            f"{what} {path} is empty"
            + (f": a {what} sets some of the sections {sections}" if sections else "")
        )
    if not isinstance(tree, dict):
        kind = {str: "text", list: "a list", int: "a number", float: "a number"}.get(
            type(tree), type(tree).__name__
        )
        raise not_a(
            f"it holds {kind} ({shown(tree, 60)}), not a mapping"
            + (f" of sections ({sections})" if sections else "")
        )
    return tree


def load(
    cls: type, tree: dict, overrides: list[str] | None = None, *, where: str = "defaults", prefix: str = ""
) -> Any:
    """`cls` from a mapping (read from `where`) and dotted overrides: the file's mistakes are
    named as the file's, the overrides' as the command line's. `prefix` ("demo.") names keys of
    a section loaded on its own."""
    build(cls, tree, prefix, where)
    tree = dict(tree)
    for key, value in parse_overrides(overrides or [], cls):
        set_dotted(tree, key, value, f"override {prefix}{key}")
    return build(cls, tree, prefix, "command-line override" if overrides else where)


def to_dict(cfg: Any) -> dict:
    """Plain nested dict (tuples as lists), ready for yaml.safe_dump."""

    def plain(value: Any) -> Any:
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(cfg))


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(dotted key, type, default, help) for every field: the source of `vipo config keys`."""
    rows = []
    instance = cls()
    for f in dataclasses.fields(cls):
        tp = field_types(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            rows += describe(tp, f"{prefix}{f.name}.")
        else:
            rows.append(
                (f"{prefix}{f.name}", type_name(tp), getattr(instance, f.name), f.metadata.get("help", ""))
            )
    return rows
