"""Tile configs per GPU arch: tables a GPU sweep replaces by committing one JSON file.

Every Triton launcher asks `get(family, cls, arch)` for its tiles. A family is one op's launch config,
declared in the op's file (`CONFIG_FAMILIES`: the config dataclass, its shape classes, the kernel's limits,
the sweep candidates); a shape class is the set of shapes that share one config. Map a shape to its class
with the op's helper or with `shape_class(family, **shape)`, which calls it:

    attention_fwd      attention.fwd_class(head_dim, lk)         "d64-long", "d64-short", ..., "d256-short"
    attention_bwd      attention.bwd_class(head_dim)             "d64", "d128", "d256"
    group_norm_silu    group_norm_silu.config_class(c_per_g)     "c2", "c4", ..., "c64" (cN: c_per_g <= N)
    fourier_embedding  fourier_embedding.config_class()          "all"

The config a launch gets, first match wins:
  1. the innermost `override(family, cls, config, arch)` block (the sweep times candidates this way);
  2. the file named by $SDXL_KERNELS_CONFIGS when its "arch" is the launch's arch (it may hold only some
     families and classes; a file for another arch changes nothing);
  3. the packaged table `sm{arch}.json` beside this file, which holds every family and class.

File format (FORMAT = 1), one config per line as `write` lays it out:

    {"format": 1, "arch": 90, "notes": ["how these were chosen"],
     "attention_fwd": {"d64-long": {"block_m": 128, "block_n": 128, "num_warps": 8, "num_stages": 3,
                                    "tma": true}, ...},
     "attention_bwd": {"d64": {...}, ...}, "group_norm_silu": {"c2": {...}, ...},
     "fourier_embedding": {"all": {"block": 512, "num_warps": 4}}}

A field with a default in its dataclass may be left out (`write` leaves out the None ones). Loading is strict:
an unknown key, class or field, a missing field, a wrong type, another format version, an arch other than
80/90 or a config outside the kernel's limits (the family's `check`) raises ConfigError, a ValueError that
names the file, the family/class and the problem. Tables are read once per (arch, $SDXL_KERNELS_CONFIGS);
`reset()` forgets them.

A sweep on a GPU: for each class, time each of `candidates(family, cls, arch)` inside
`override(family, cls, cfg, arch)`; `write(path, arch, best, notes)`; check the file with
`SDXL_KERNELS_CONFIGS=path python -m sdxl_kernels.tools.compile_check`; commit it as `sm{arch}.json`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import json
import os
import pathlib
import typing
from collections.abc import Callable, Iterator, Sequence
from importlib import resources

import torch

FORMAT = 1
ARCHS = (80, 90)
ENV_VAR = "SDXL_KERNELS_CONFIGS"
WARPS = (1, 2, 4, 8, 16)
MAX_STAGES = 8
_META = ("format", "arch", "notes")
_OPS = ("attention", "group_norm_silu", "fourier_embedding")  # the op modules that declare CONFIG_FAMILIES


class ConfigError(ValueError):
    """A config file, or a config, that does not fit the format or the kernel."""


@dataclasses.dataclass(frozen=True)
class Family:
    """One op's launch config, as its op file declares it."""

    name: str
    config: type  # frozen dataclass of one config
    classes: tuple[str, ...]  # shape classes, in table order
    check: Callable[[int, str, object], None]  # (arch, cls, cfg): raises ValueError when cfg exceeds the kernel
    sweep: Callable[[int, str], Sequence]  # (arch, cls) → the declared sweep candidates
    classify: Callable[..., str]  # shape keywords → shape class


# ---- limits shared by every family -------------------------------------------------------------------------


def check_pow2(name: str, value: int, lo: int, hi: int) -> None:
    if not lo <= value <= hi or value & (value - 1):
        raise ValueError(f"{name} = {value}: must be a power of two in {lo}..{hi}")


def check_launch(cfg) -> None:
    """num_warps one of WARPS; num_stages (when the config has one and sets it) in 1..MAX_STAGES."""
    if cfg.num_warps not in WARPS:
        raise ValueError(f"num_warps = {cfg.num_warps}: must be one of {', '.join(map(str, WARPS))}")
    stages = getattr(cfg, "num_stages", None)
    if stages is not None and not 1 <= stages <= MAX_STAGES:
        raise ValueError(f"num_stages = {stages}: must be in 1..{MAX_STAGES}")


# ---- families (collected from the ops on first use: the ops import this module) ---------------------------

_families: dict[str, Family] | None = None


def families() -> dict[str, Family]:
    global _families
    if _families is None:
        found = {}
        for mod in _OPS:
            for fam in importlib.import_module(f"..ops.{mod}", __name__).CONFIG_FAMILIES:
                found[fam.name] = fam
        _families = found
    return _families


def __getattr__(name: str):
    if name == "FAMILIES":  # {family name: Family}, lazily
        return families()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _family(name: str) -> Family:
    fams = families()
    if name not in fams:
        raise ConfigError(f"unknown config family {name!r}; families: {', '.join(fams)}")
    return fams[name]


def _check_class(fam: Family, cls: str) -> None:
    if cls not in fam.classes:
        raise ConfigError(f"{fam.name}: unknown class {cls!r}; classes: {', '.join(fam.classes)}")


def _check_arch(arch) -> None:
    if type(arch) is not int or arch not in ARCHS:
        raise ConfigError(f"arch {arch!r}: must be one of {', '.join(map(str, ARCHS))}")


def shape_class(family: str, **shape) -> str:
    """The shape class of `shape` (the keywords of the family's helper, e.g. head_dim=64, lk=77)."""
    return _family(family).classify(**shape)


# ---- validation ---------------------------------------------------------------------------------------------


@functools.cache
def _fields(config: type) -> dict[str, tuple]:
    """field → (accepted types, required): int fields take no bools, `int | None` fields take null."""
    hints = typing.get_type_hints(config)
    return {
        f.name: (typing.get_args(hints[f.name]) or (hints[f.name],), f.default is dataclasses.MISSING)
        for f in dataclasses.fields(config)
    }


def _type_name(types: tuple) -> str:
    return " or ".join("null" if t is type(None) else t.__name__ for t in types)


def _validate(fam: Family, arch: int, cls: str, cfg, where: str) -> None:
    """cfg is fam's dataclass with well-typed fields and fits the kernel on arch; else ConfigError at `where`."""
    if type(cfg) is not fam.config:
        raise ConfigError(f"{where}: expected a {fam.config.__name__}, got {type(cfg).__name__}")
    for name, (types, _) in _fields(fam.config).items():
        value = getattr(cfg, name)
        if type(value) not in types:
            raise ConfigError(f"{where}: field {name!r} must be {_type_name(types)}, got {value!r}")
    try:
        fam.check(arch, cls, cfg)
    except ValueError as e:
        raise ConfigError(f"{where}: does not fit the kernel on sm_{arch}: {e}") from None


def _parse_config(fam: Family, arch: int, cls: str, raw, where: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected an object of fields, got {raw!r}")
    fields = _fields(fam.config)
    for key in raw:
        if key not in fields:
            raise ConfigError(f"{where}: unknown field {key!r}; fields: {', '.join(fields)}")
    for name, (_, required) in fields.items():
        if required and name not in raw:
            raise ConfigError(f"{where}: missing field {name!r}")
    cfg = fam.config(**raw)
    _validate(fam, arch, cls, cfg, where)
    return cfg


def _parse(doc, where: str, complete: bool) -> tuple[int, dict]:
    """(arch, {family: {cls: config}}) of a parsed file; `complete` also requires every family and class."""
    if not isinstance(doc, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {type(doc).__name__}")
    fams = families()
    for key in doc:
        if key not in _META and key not in fams:
            raise ConfigError(f"{where}: unknown key {key!r}; keys: {', '.join(_META + tuple(fams))}")
    if type(doc.get("format")) is not int or doc["format"] != FORMAT:
        raise ConfigError(f"{where}: format {doc.get('format')!r}: this version reads format {FORMAT}")
    arch = doc.get("arch")
    if type(arch) is not int or arch not in ARCHS:
        raise ConfigError(f"{where}: arch {arch!r}: must be one of {', '.join(map(str, ARCHS))}")
    notes = doc.get("notes", [])
    if not isinstance(notes, list) or not all(isinstance(n, str) for n in notes):
        raise ConfigError(f"{where}: notes must be a list of strings")
    table = {}
    for name, fam in fams.items():
        entries = doc.get(name, {})
        if not isinstance(entries, dict):
            raise ConfigError(f"{where}: {name}: expected an object of classes, got {entries!r}")
        for cls, raw in entries.items():
            if cls not in fam.classes:
                raise ConfigError(f"{where}: {name}: unknown class {cls!r}; classes: {', '.join(fam.classes)}")
            table.setdefault(name, {})[cls] = _parse_config(fam, arch, cls, raw, f"{where}: {name}/{cls}")
        missing = [cls for cls in fam.classes if cls not in entries]
        if complete and missing:
            raise ConfigError(f"{where}: {name}: missing classes {', '.join(missing)}")
    return arch, table


def _read(path, complete: bool = False) -> tuple[int, dict]:
    where = str(path)
    path = pathlib.Path(path) if isinstance(path, (str, os.PathLike)) else path  # or a resources Traversable
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"{where}: cannot read: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{where}: not JSON: {e}") from None
    return _parse(doc, where, complete)


def load(path) -> tuple[int, dict]:
    """(arch, {family: {cls: config}}) of a config file, which may hold only some families and classes."""
    return _read(path)


# ---- the table in force -------------------------------------------------------------------------------------

_tables: dict[tuple[int, str], dict] = {}
# A plain list, not a context variable: autograd runs the backward in its own thread, which must see it.
_overrides: list[tuple[str, str, int | None, object]] = []


def packaged_path(arch: int):
    return resources.files(__name__).joinpath(f"sm{arch}.json")


def _table(arch: int) -> dict:
    env = os.environ.get(ENV_VAR, "")
    hit = _tables.get((arch, env))
    if hit is None:
        _check_arch(arch)
        path = packaged_path(arch)
        file_arch, hit = _read(path, complete=True)
        if file_arch != arch:
            raise ConfigError(f"{path}: arch {file_arch}, but the file is the sm_{arch} table")
        if env:
            env_arch, entries = _read(env)
            if env_arch == arch:
                hit = {name: hit[name] | entries.get(name, {}) for name in hit}
        _tables[(arch, env)] = hit
    return hit


def table(arch: int) -> dict[str, dict[str, object]]:
    """{family: {cls: config}} in force for arch: the packaged table, with $SDXL_KERNELS_CONFIGS's entries
    for this arch in place of its own (overrides aside). A copy: change configs through a file or override."""
    return {name: dict(entries) for name, entries in _table(arch).items()}


def reset() -> None:
    """Forget the tables read so far (tests that change a file or the environment)."""
    _tables.clear()


def get(family: str, cls: str, arch: int):
    """The config launchers use for (family, cls) on arch: an override, else the table in force."""
    for o_family, o_cls, o_arch, cfg in reversed(_overrides):
        if o_family == family and o_cls == cls and o_arch in (None, arch):
            return cfg
    try:
        return _table(arch)[family][cls]
    except KeyError:
        _check_class(_family(family), cls)  # raises the unknown family/class error
        raise


@contextlib.contextmanager
def override(family: str, cls: str, config, arch: int | None = None) -> Iterator[object]:
    """Inside the block, launches of (family, cls) on arch (every arch when None) use `config`. Nests; restored
    on exit or exception. The config must fit the kernel on arch (when None: on at least one arch)."""
    fam = _family(family)
    _check_class(fam, cls)
    archs = ARCHS if arch is None else (arch,)
    if arch is not None:
        _check_arch(arch)
    errors = []
    for a in archs:
        try:
            _validate(fam, a, cls, config, f"override {family}/{cls}")
        except ConfigError as e:
            errors.append(e)
    if len(errors) == len(archs):
        raise errors[0]
    entry = (family, cls, arch, config)
    _overrides.append(entry)
    try:
        yield config
    finally:
        # By identity: an equal override further out must stay.
        del _overrides[next(i for i in reversed(range(len(_overrides))) if _overrides[i] is entry)]


def candidates(family: str, cls: str, arch: int) -> list:
    """The configs a sweep times for (family, cls) on arch: the table's config first, then the family's
    declared candidates (each fits the kernel and compiles without spills: compile_check builds them all)."""
    fam = _family(family)
    _check_class(fam, cls)
    _check_arch(arch)
    return list(dict.fromkeys([_table(arch)[family][cls], *fam.sweep(arch, cls)]))


# ---- writing ------------------------------------------------------------------------------------------------


def dump(arch: int, table: dict, notes: Sequence[str] = ()) -> dict:
    """The file's JSON object for arch's {family: {cls: config}} (all or some entries), validated."""
    _check_arch(arch)
    fams = families()
    for name in table:
        _family(name)
    doc = {"format": FORMAT, "arch": arch, "notes": [str(n) for n in notes]}
    for name, fam in fams.items():
        entries = table.get(name) or {}
        for cls in entries:
            _check_class(fam, cls)
        out = {}
        for cls in fam.classes:
            if cls in entries:
                cfg = entries[cls]
                _validate(fam, arch, cls, cfg, f"{name}/{cls}")
                out[cls] = {k: v for k, v in dataclasses.asdict(cfg).items() if v is not None}
        if out:
            doc[name] = out
    return doc


def _layout(doc: dict) -> str:
    """JSON with one config per line, so a sweep's commit reads as one changed line per changed class."""
    dumps = functools.partial(json.dumps, ensure_ascii=False)
    parts = []
    for key, value in doc.items():
        if isinstance(value, dict):
            rows = ",\n".join(f"    {dumps(cls)}: {dumps(cfg)}" for cls, cfg in value.items())
            parts.append(f"  {dumps(key)}: {{\n{rows}\n  }}")
        elif isinstance(value, list) and value:
            rows = ",\n".join(f"    {dumps(item)}" for item in value)
            parts.append(f"  {dumps(key)}: [\n{rows}\n  ]")
        else:
            parts.append(f"  {dumps(key)}: {dumps(value)}")
    return "{\n" + ",\n".join(parts) + "\n}\n"


def write(path, arch: int, table: dict, notes: Sequence[str] = ()) -> None:
    """Writes `dump(arch, table, notes)` to path (a file `load` and $SDXL_KERNELS_CONFIGS read back)."""
    pathlib.Path(path).write_text(_layout(dump(arch, table, notes)), encoding="utf-8")


# ---- devices ------------------------------------------------------------------------------------------------


def device_arch(device: torch.device | None) -> int:
    """The table a device uses: 90 for Hopper and newer; 80 for older GPUs, non-CUDA devices (the
    interpreter) and None."""
    if device is None or device.type != "cuda":
        return 80
    return _cuda_arch(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _cuda_arch(index: int) -> int:
    major, _ = torch.cuda.get_device_capability(index)
    return 90 if major >= 9 else 80
