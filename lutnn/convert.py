"""Model surgery: swap ``nn.Linear``/``nn.Conv2d`` layers for LUT layers in place.

In the spirit of torchao's ``quantize_(model, config)``::

    report = lutnn.convert_(model, lutnn.LUTConfig(subvec_len=8, exclude=["head", "patch_embed.*"]))
    print(report)

Layers are selected by type (``layer_types``) and by glob patterns on their qualified
names (``include``/``exclude``, ``fnmatch`` syntax). ``overrides`` maps a pattern to
per-layer C/K/V; when several patterns match, later entries win.
"""
from __future__ import annotations

import copy
import fnmatch
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Mapping, Sequence

from torch import nn

from .layers import LUTBase, LUTConv2d, LUTLinear, conv_unsupported_reason

# Registry: config name -> (dense type, LUT type, why-unsupported check)
LAYER_TYPES: dict[str, tuple[type[nn.Module], type[LUTBase], Callable[[nn.Module], str | None]]] = {
    "linear": (nn.Linear, LUTLinear, lambda m: None),
    "conv2d": (nn.Conv2d, LUTConv2d, conv_unsupported_reason),
}
SPEC_KEYS = ("num_codebooks", "subvec_len", "num_prototypes", "init_temperature")

# Modules with an eval fast path that reads their children's weights directly (or feeds them
# nested tensors) instead of calling them: converted children would silently run dense. Each
# entry names a per-module attribute that the fast path requires, the value that turns it off,
# and why. nn.MultiheadAttention is different: its projections are never converted at all.
FAST_PATHS: dict[type[nn.Module], tuple[str, Any, str]] = {
    nn.TransformerEncoderLayer: ("activation_relu_or_gelu", 0, "fused encoder-layer kernel reads linear1/linear2 "
                                                               "weights"),
    nn.TransformerEncoder: ("use_nested_tensor", False, "nested-tensor fast path"),
}


class LUTConfigError(ValueError):
    """A conversion config that cannot be applied to the model; the message says which key.

    ``key`` is that config key when known, e.g. ``"subvec_len"`` or ``"overrides['blocks.*'].subvec_len"``.
    """

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


@dataclass
class LUTConfig:
    """What to convert and with which codebooks.

    ``subvec_len`` (V) or ``num_codebooks`` (C) — give at most one. With neither, V
    defaults to ``kh*kw`` for k×k convolutions (one channel's patch) and otherwise to the
    largest divisor of D up to 8. An explicit V that does not divide D is an error.
    ``strict=False`` leaves layers that cannot be converted (V not dividing D, grouped
    convs) dense and lists them in the report instead of raising.
    """

    subvec_len: int | None = None
    num_codebooks: int | None = None
    num_prototypes: int = 16
    init_temperature: float = 1.0
    layer_types: Sequence[str] = ("linear", "conv2d")
    include: Sequence[str] = ("*",)
    exclude: Sequence[str] = ()
    overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    strict: bool = True

    def __post_init__(self) -> None:
        unknown = [t for t in self.layer_types if t not in LAYER_TYPES]
        if unknown:
            raise LUTConfigError(f"layer_types: unknown {unknown}; known: {sorted(LAYER_TYPES)}", "layer_types")
        for key in ("include", "exclude", "layer_types"):
            value = getattr(self, key)
            if isinstance(value, str):
                raise LUTConfigError(f"{key} must be a list of strings, got the string {value!r}", key)
        _check_spec(self._global_spec(), "LUTConfig", "")
        for pattern, spec in self.overrides.items():
            where = f"overrides[{pattern!r}]"
            if not isinstance(spec, Mapping):
                raise LUTConfigError(f"{where} must be a mapping of {SPEC_KEYS}, got {spec!r}", where)
            bad = sorted(set(spec) - set(SPEC_KEYS))
            if bad:
                raise LUTConfigError(f"{where}: unknown keys {bad}; allowed: {list(SPEC_KEYS)}", where)
            _check_spec(spec, where, where + ".")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "lut config") -> "LUTConfig":
        allowed = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise LUTConfigError(f"{where}: unknown keys {unknown}; allowed: {sorted(allowed)}", unknown[0])
        return cls(**data)

    def _global_spec(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in SPEC_KEYS}

    def codebook_key(self, name: str) -> str:
        """The config key that sets layer ``name``'s C/V: the last matching override that sets one, else global."""
        for pattern, override in reversed(list(self.overrides.items())):
            if fnmatch.fnmatchcase(name, pattern):
                for key in ("subvec_len", "num_codebooks"):
                    if key in override:
                        return f"overrides[{pattern!r}].{key}"
        return "num_codebooks" if self.num_codebooks is not None else "subvec_len"

    def spec_for(self, name: str) -> dict[str, Any]:
        """Merged C/K/V/tau for layer ``name``: globals, then matching overrides in order."""
        spec = self._global_spec()
        for pattern, override in self.overrides.items():
            if fnmatch.fnmatchcase(name, pattern):
                if "num_codebooks" in override or "subvec_len" in override:
                    spec["num_codebooks"] = spec["subvec_len"] = None
                spec.update(override)
        return spec


def _check_spec(spec: Mapping[str, Any], where: str, prefix: str) -> None:
    """Check C/K/V/tau values; ``prefix`` + key is the config key named in the error."""
    if spec.get("num_codebooks") is not None and spec.get("subvec_len") is not None:
        raise LUTConfigError(f"{where}: give num_codebooks or subvec_len, not both", prefix + "subvec_len")
    for key in ("num_codebooks", "subvec_len"):
        v = spec.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
            raise LUTConfigError(f"{where}: {key} must be a positive integer, got {v!r}", prefix + key)
    k = spec.get("num_prototypes", 16)
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= 256:
        raise LUTConfigError(f"{where}: num_prototypes (K) must be an integer in [1, 256], got {k!r}",
                             prefix + "num_prototypes")
    t = spec.get("init_temperature", 1.0)
    if not isinstance(t, (int, float)) or t <= 0:
        raise LUTConfigError(f"{where}: init_temperature must be > 0, got {t!r}", prefix + "init_temperature")


@dataclass
class LayerReport:
    name: str
    kind: str
    in_features: int
    out_features: int
    num_codebooks: int
    num_prototypes: int
    subvec_len: int
    params_before: int
    params_after: int


@dataclass
class ConversionReport:
    converted: list[LayerReport] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (name, reason)
    fast_paths_off: list[tuple[str, str]] = field(default_factory=list)  # (module name, which fast path)

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.converted]

    def to_markdown(self) -> str:
        lines = [
            "| layer | type | D | M | C | K | V | params before | params after |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {r.name} | {r.kind} | {r.in_features} | {r.out_features} | {r.num_codebooks} | "
            f"{r.num_prototypes} | {r.subvec_len} | {r.params_before:,} | {r.params_after:,} |"
            for r in self.converted
        ]
        before = sum(r.params_before for r in self.converted)
        after = sum(r.params_after for r in self.converted)
        lines.append(f"\n{len(self.converted)} layers converted; params {before:,} -> {after:,}.")
        if self.skipped:
            lines.append("Left dense: " + "; ".join(f"{n} ({why})" for n, why in self.skipped))
        if self.fast_paths_off:
            lines.append("Fast paths turned off (they bypass LUT layers): "
                         + "; ".join(f"{n or '<root>'} ({why})" for n, why in self.fast_paths_off))
        return "\n".join(lines)

    __str__ = to_markdown


def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def convertible_layers(model: nn.Module, config: LUTConfig) -> dict[str, tuple[str, nn.Module]]:
    """Layers of the selected dense types, by qualified name."""
    owned_by_mha = {
        f"{name}.{child}" if name else child
        for name, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)
        for child, _ in m.named_children()
    }
    found = {}
    for name, module in model.named_modules():
        for kind in config.layer_types:
            dense_type = LAYER_TYPES[kind][0]
            # exact type check: subclasses such as LoRA wrappers may override forward
            if type(module) is dense_type and name not in owned_by_mha:
                found[name] = (kind, module)
    return found


def _check_patterns(patterns: Sequence[str], names: Sequence[str], key: str) -> None:
    for pattern in patterns:
        if pattern != "*" and not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            sample = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
            raise LUTConfigError(f"{key} pattern {pattern!r} matched no convertible layer; layers: {sample}", key)


def convert_(model: nn.Module, config: LUTConfig | Mapping[str, Any] | None = None) -> ConversionReport:
    """Replace the selected layers of ``model`` in place and report what changed."""
    if config is None:
        config = LUTConfig()
    elif isinstance(config, Mapping):
        config = LUTConfig.from_dict(config)
    candidates = convertible_layers(model, config)
    names = list(candidates)
    _check_patterns(config.include, names, "include")
    _check_patterns(config.exclude, names, "exclude")
    _check_patterns(list(config.overrides), names, "overrides")

    report = ConversionReport()
    for name, (kind, dense) in candidates.items():
        if not any(fnmatch.fnmatchcase(name, p) for p in config.include):
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in config.exclude):
            continue
        _, lut_type, unsupported = LAYER_TYPES[kind]
        try:
            reason = unsupported(dense)
            if reason:
                raise ValueError(reason)
            lut = lut_type.from_dense(dense, **config.spec_for(name))
        except ValueError as err:
            if config.strict:
                raise LUTConfigError(f"layer {name!r} ({kind}): {err}", config.codebook_key(name)) from None
            report.skipped.append((name, str(err)))
            continue
        lut.train(dense.training)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, lut)
        report.converted.append(LayerReport(
            name, kind, lut.in_features, lut.out_features, lut.num_codebooks, lut.num_prototypes,
            lut.subvec_len, _n_params(dense), _n_params(lut),
        ))
    report.fast_paths_off = disable_fast_paths(model)
    return report


def disable_fast_paths(model: nn.Module) -> list[tuple[str, str]]:
    """Turn off the :data:`FAST_PATHS` of every module that holds a LUT layer; returns (name, why)."""
    done = []
    for name, module in model.named_modules():
        entry = FAST_PATHS.get(type(module))
        if entry is None or not any(isinstance(m, LUTBase) for m in module.modules()):
            continue
        attr, off, why = entry
        if getattr(module, attr, off) != off:
            setattr(module, attr, off)
            done.append((name, why))
    return done


def convert(model: nn.Module, config: LUTConfig | Mapping[str, Any] | None = None) -> tuple[nn.Module, ConversionReport]:
    """Like :func:`convert_` but on a deep copy; the original model is untouched."""
    model = copy.deepcopy(model)
    return model, convert_(model, config)


def lut_layers(model: nn.Module) -> dict[str, LUTBase]:
    """All LUT layers of ``model`` by qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LUTBase)}


def set_mode(model: nn.Module, mode: str) -> nn.Module:
    """Set every LUT layer's mode (``auto``/``ste``/``soft``/``lut``/``dense``)."""
    for layer in lut_layers(model).values():
        layer.set_mode(mode)
    return model


def quantize_tables_(model: nn.Module, granularity: str | None = "output") -> dict[str, dict[str, float]]:
    """Int8 tables for every LUT layer (``None``: back to fp32); per-layer error reports by name."""
    return {name: layer.quantize_tables(granularity) for name, layer in lut_layers(model).items()}
