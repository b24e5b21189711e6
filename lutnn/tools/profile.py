"""Operation counts and inference size of dense and LUT models (OpCounter).

Counting is done by `thop <https://github.com/Lyken17/pytorch-OpCounter>`_'s module
hooks, with custom rules for the LUT layers so their work is neither zero nor mixed
with the dense unit. Units, per forward pass of the given input batch:

* ``macs`` — multiply-accumulates: thop's unit (conv/linear count one per weight use;
  thop's elementwise rules — norms, softmax, pooling — count their ops here too). For a
  LUT layer it is the **encode** distance work ``N*C*K*V`` (``x . p`` per sub-vector and
  prototype; ``|p|^2`` is precomputed and ``|x|^2`` does not change the argmin).
* ``compares`` — argmin comparisons of a LUT layer's encode, ``N*C*(K-1)``.
* ``adds`` — a LUT layer's **lookup** additions, ``N*C*M`` (each output starts from the
  bias and adds one table row per codebook): additions with no multiply at all.
* ``flops = 2*macs + adds + compares`` (one MAC = one multiply + one add).

A :class:`~lutnn.maddness.MaddnessLinear` (hash-tree encoder) has no MACs: ``N*C*L``
threshold compares for its ``L``-level trees, then the same ``N*C*M`` lookup-adds.

``N`` is the number of rows the layer multiplies: tokens for linear layers, output
pixels (``B*Hout*Wout``) for convolutions. Operations outside ``nn.Module`` leaves
(attention's ``q @ k.T`` and ``attn @ v``, residual adds) are invisible to thop's hooks
and identical in the dense and LUT models, so they are left out of both.

Size — what must be stored to run the model for inference:

* every dense tensor (parameters and floating-point buffers such as BatchNorm
  statistics) at 4 bytes per element (fp32);
* a LUT layer stores prototypes ``C*K*V``, table ``C*K*M`` and bias ``M`` — its dense
  weight ``W [M, D]`` and temperature are training-only, the table replaces them:
  ``fp32 = 4*(C*K*V + C*K*M + M)``;
  ``int8 = 4*C*K*V + C*K*M + 4*S + 4*M`` with ``S`` int8 scales (``M`` per output column,
  :class:`lutnn.layers.QuantizedTable`'s default granularity).
* ``code_bytes`` — not part of the model: the encoded activations a LUT layer hands to
  its lookup, ``N*C*ceil(log2 K)`` bits per forward (4-bit codes at ``K = 16``), against
  ``4*N*D`` bytes for the fp32 rows a dense layer reads.

CLI::

    lutnn profile --model resnet18 --per-layer
    lutnn profile --model deit_tiny_patch16_224 --config configs/deit.yaml
"""
from __future__ import annotations

import argparse
import copy
import math
import sys
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from ..pipeline.cli import emit, first_line
from ..convert import LUTConfig, LUTConfigError, convert, convertible_layers
from ..layers import LUTBase
from ..maddness import MaddnessLinear

FP32_BYTES = 4
TABLE_LAYERS = (LUTBase, MaddnessLinear)


@dataclass
class LayerCost:
    """Work and stored bytes of one leaf module for one forward pass."""

    name: str
    kind: str
    macs: int = 0
    adds: int = 0
    compares: int = 0
    bytes_fp32: int = 0
    bytes_int8: int = 0
    code_bytes: float = 0.0

    @property
    def flops(self) -> int:
        return 2 * self.macs + self.adds + self.compares


@dataclass
class ModelProfile:
    """Per-layer costs of one model on one input batch; totals are sums over ``layers``."""

    name: str
    input_shape: tuple[int, ...]
    layers: list[LayerCost] = field(default_factory=list)

    def total(self, attr: str) -> float:
        return sum(getattr(layer, attr) for layer in self.layers)

    @property
    def macs(self) -> int:
        return int(self.total("macs"))

    @property
    def flops(self) -> int:
        return int(self.total("flops"))

    @property
    def bytes_fp32(self) -> int:
        return int(self.total("bytes_fp32"))

    @property
    def bytes_int8(self) -> int:
        return int(self.total("bytes_int8"))

    def summary(self) -> dict[str, float]:
        """Totals in the units of the Markdown table (G = 1e9, MB = 1e6 bytes)."""
        return {
            "GMACs": self.macs / 1e9,
            "G lookup-adds": self.total("adds") / 1e9,
            "G compares": self.total("compares") / 1e9,
            "GFLOPs": self.flops / 1e9,
            "MB fp32": self.bytes_fp32 / 1e6,
            "MB int8 tables": self.bytes_int8 / 1e6,
            "KB codes": self.total("code_bytes") / 1e3,
        }

    def to_markdown(self, per_layer: bool = False) -> str:
        parts = [compare_markdown([self])]
        if per_layer:
            parts.append(layers_markdown(self))
        return "\n\n".join(parts)

    __str__ = to_markdown


# -- thop rules ------------------------------------------------------------------------
def _lut_cost(m: LUTBase, n: int) -> LayerCost:
    c, k, v, out = m.num_codebooks, m.num_prototypes, m.subvec_len, m.out_features
    cost = LayerCost("", type(m).__name__)
    if m.effective_mode() == "dense":
        cost.macs = n * m.in_features * out
    else:
        cost.macs = n * c * k * v
        cost.compares = n * c * (k - 1)
        cost.adds = n * c * out
        cost.code_bytes = n * c * math.ceil(math.log2(k)) / 8 if k > 1 else 0.0
    return cost


def _maddness_cost(m: MaddnessLinear, n: int) -> LayerCost:
    """MADDness encodes with ``L`` threshold comparisons per codebook and no multiply."""
    c, levels = m.num_codebooks, m.split_dims.shape[1]
    return LayerCost("", type(m).__name__, compares=n * c * levels, adds=n * c * m.out_features,
                     code_bytes=n * c * levels / 8)


def _table_rule(extra: dict[nn.Module, LayerCost]):
    """thop hook for table-lookup layers: ``total_ops`` gets the MACs, ``extra`` the full cost."""

    def rule(m: nn.Module, inputs: tuple[Tensor, ...], y: Tensor) -> None:
        n = y.numel() // m.out_features
        call = _lut_cost(m, n) if isinstance(m, LUTBase) else _maddness_cost(m, n)
        m.total_ops += call.macs
        if m in extra:  # a module called more than once per forward
            for key in ("macs", "adds", "compares", "code_bytes"):
                setattr(call, key, getattr(call, key) + getattr(extra[m], key))
        extra[m] = call

    return rule


def _flatten(info: dict[str, tuple], prefix: str = "") -> dict[str, float]:
    """thop's nested ``ret_layer_info`` -> ``{qualified leaf name: ops}``."""
    out = {}
    for name, (ops, _params, children) in info.items():
        qual = f"{prefix}.{name}" if prefix else name
        out.update(_flatten(children, qual) if children else {qual: ops})
    return out


@contextmanager
def _thop(model: nn.Module) -> Iterator[Callable]:
    """thop's ``profile``, and afterwards no trace of it on ``model``: thop 0.1.1 removes its
    ``total_ops``/``total_params`` buffers from hooked modules only, leaking them into
    every other module's ``state_dict``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # thop imports distutils
        from thop import profile as thop_profile
    try:
        yield thop_profile
    finally:
        for m in model.modules():
            m._buffers.pop("total_ops", None)
            m._buffers.pop("total_params", None)


def thop_macs(model: nn.Module, inputs: tuple[Tensor, ...]) -> int:
    """thop's own total for ``model`` (no LUT rules): the reference for dense models."""
    with _thop(model) as thop_profile:
        total, _ = thop_profile(model, inputs, verbose=False)
    return int(total)


# -- sizes -----------------------------------------------------------------------------
def table_layer_bytes(layer: LUTBase | MaddnessLinear) -> tuple[int, int]:
    """``(fp32, int8)`` inference bytes of a LUT layer (formula in the module docstring).

    A :class:`~lutnn.maddness.MaddnessLinear` stores ``C*(2**L - 1)`` fp32 thresholds and
    ``C*L`` one-byte split dimensions in place of the prototypes.
    """
    if isinstance(layer, MaddnessLinear):
        c, levels, m = layer.num_codebooks, layer.split_dims.shape[1], layer.out_features
        encoder = FP32_BYTES * c * (2 ** levels - 1) + c * levels
        table = c * layer.num_prototypes * m
        bias = FP32_BYTES * m if layer.bias is not None else 0
        return encoder + FP32_BYTES * table + bias, encoder + table + FP32_BYTES * m + bias
    c, k, v, m = layer.num_codebooks, layer.num_prototypes, layer.subvec_len, layer.out_features
    bias = m if layer.bias_or_none() is not None else 0
    fp32 = FP32_BYTES * (c * k * v + c * k * m + bias)
    q = layer.quantized_table
    scales = q.scale.numel() if q is not None else m
    int8 = FP32_BYTES * (c * k * v + scales + bias) + c * k * m
    return fp32, int8


def _dense_bytes(tensors) -> int:
    return FP32_BYTES * sum(t.numel() for t in tensors if t is not None and t.is_floating_point())


def _own_tensors(module: nn.Module) -> list[Tensor]:
    return list(module._parameters.values()) + list(module._buffers.values())


# -- profile ---------------------------------------------------------------------------
@torch.no_grad()
def profile(
    model: nn.Module,
    inputs: Tensor | Sequence[Tensor] | None = None,
    input_size: Sequence[int] = (3, 224, 224),
    batch_size: int = 1,
    name: str = "model",
) -> ModelProfile:
    """Per-layer MACs/adds/compares and inference bytes of ``model`` (run once in eval mode).

    ``inputs`` defaults to a zero batch of ``[batch_size, *input_size]``. Leaf modules with
    neither work nor stored tensors are omitted; parameters held by non-leaf modules
    (ViT position embeddings, class tokens) are one ``(other tensors)`` row.
    """
    if inputs is None:
        param = next(model.parameters(), None)
        inputs = torch.zeros(batch_size, *input_size, device=param.device if param is not None else None)
    inputs = (inputs,) if isinstance(inputs, Tensor) else tuple(inputs)
    lut_types = {type(m) for m in model.modules() if isinstance(m, TABLE_LAYERS)}
    extra: dict[nn.Module, LayerCost] = {}
    with _thop(model) as thop_profile:
        _, _, info = thop_profile(model, inputs, custom_ops={t: _table_rule(extra) for t in lut_types},
                                  verbose=False, ret_layer_info=True)
    ops = _flatten(info)

    result = ModelProfile(name, tuple(inputs[0].shape))
    other = 0
    for qual, module in model.named_modules():
        is_leaf = next(module.children(), None) is None
        if not is_leaf:
            other += _dense_bytes(_own_tensors(module))
            continue
        if isinstance(module, TABLE_LAYERS):
            cost = extra.get(module, LayerCost("", type(module).__name__))
            cost.bytes_fp32, cost.bytes_int8 = table_layer_bytes(module)
        else:
            cost = LayerCost("", type(module).__name__, macs=int(ops.get(qual, 0)))
            cost.bytes_fp32 = cost.bytes_int8 = _dense_bytes(_own_tensors(module))
        cost.name = qual or name
        if cost.flops or cost.bytes_fp32:
            result.layers.append(cost)
    if other:
        result.layers.append(LayerCost("(other tensors)", "-", bytes_fp32=other, bytes_int8=other))
    return result


# -- Markdown --------------------------------------------------------------------------
def compare_markdown(profiles: Sequence[ModelProfile]) -> str:
    """One row of totals per model (see the module docstring for the units)."""
    keys = list(profiles[0].summary())
    lines = [
        "| model | input | " + " | ".join(keys) + " |",
        "|---|---|" + "---:|" * len(keys),
    ]
    for p in profiles:
        values = " | ".join(f"{v:,.3f}" for v in p.summary().values())
        lines.append(f"| {p.name} | {'x'.join(map(str, p.input_shape))} | {values} |")
    lines.append(
        "\nMACs: multiply-accumulates (thop). GFLOPs = 2*MACs + lookup-adds + compares. "
        "Size: bytes needed at inference (LUT layers: prototypes + tables + bias; no dense weight)."
    )
    return "\n".join(lines)


def layers_markdown(p: ModelProfile) -> str:
    lines = [
        f"**{p.name}** per layer",
        "",
        "| layer | type | MACs | lookup-adds | compares | FLOPs | bytes fp32 | bytes int8 tables |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {c.name} | {c.kind} | {c.macs:,} | {c.adds:,} | {c.compares:,} | {c.flops:,} | "
        f"{c.bytes_fp32:,} | {c.bytes_int8:,} |"
        for c in p.layers
    ]
    return "\n".join(lines)


# -- models ----------------------------------------------------------------------------
def ends_to_keep_dense(model: nn.Module, config: LUTConfig | None = None) -> list[str]:
    """The stem and classifier that LUT-NN keeps dense: the stem sees raw pixels, the head is small
    and accuracy-critical.

    Named by a timm model's ``pretrained_cfg`` (e.g. ``patch_embed.proj``/``head``, ``conv1``/``fc``);
    for other models (torchvision), the first and last convertible layers.
    """
    convertible = list(convertible_layers(model, config or LUTConfig()))
    cfg = getattr(model, "pretrained_cfg", None) or {}
    names = []
    for key in ("first_conv", "classifier"):
        value = cfg.get(key)
        names += [value] if isinstance(value, str) else list(value or ())
    if not cfg and convertible:
        names = [convertible[0], convertible[-1]]
    return [n for n in dict.fromkeys(names) if n in convertible]


def dense_and_lut(
    model: str | nn.Module,
    config: LUTConfig | None = None,
    keep_ends_dense: bool = True,
    **model_kwargs: Any,
) -> tuple[nn.Module, nn.Module]:
    """A dense model and its LUT conversion, both in eval mode. ``model`` is a built module, or a timm
    name built randomly initialised (``pretrained=False``, ``model_kwargs`` passed to ``timm.create_model``)."""
    if isinstance(model, str):
        import timm

        try:
            model = timm.create_model(model, pretrained=False, **model_kwargs)
        except RuntimeError as err:
            raise ValueError(f"--model {model!r}: {err}") from None
    dense = model.eval()
    config = copy.deepcopy(config) if config is not None else LUTConfig()
    if keep_ends_dense:
        config.exclude = list(config.exclude) + [n for n in ends_to_keep_dense(dense, config)
                                                 if n not in config.exclude]
    lut, _ = convert(dense, config)
    return dense, lut.eval()


def default_input_size(model: nn.Module) -> tuple[int, ...]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return tuple(cfg.get("input_size", (3, 224, 224)))


def profile_pair(
    model: str | nn.Module,
    config: LUTConfig | None = None,
    input_size: Sequence[int] | None = None,
    batch_size: int = 1,
    keep_ends_dense: bool = True,
    name: str | None = None,
    **model_kwargs: Any,
) -> tuple[ModelProfile, ModelProfile]:
    """Profiles of a model (a module, or a timm name) and of its LUT conversion on the same zero batch."""
    name = name or (model if isinstance(model, str) else type(model).__name__)
    dense, lut = dense_and_lut(model, config, keep_ends_dense, **model_kwargs)
    size = tuple(input_size) if input_size else default_input_size(dense)
    x = torch.zeros(batch_size, *size)
    return profile(dense, x, name=f"{name} (dense)"), profile(lut, x, name=f"{name} (LUT)")


# -- CLI -------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="MACs/FLOPs (thop + LUT rules) and inference size of a timm or torchvision model, dense vs LUT.",
    )
    parser.add_argument("--model", help="model name (built with random weights); default: the config's model.name")
    parser.add_argument("--source", choices=["timm", "torchvision"], default=None,
                        help="where --model comes from (default: the config's model.source, else timm)")
    parser.add_argument("--input-size", type=int, nargs=3, metavar=("C", "H", "W"),
                        help="input size (default: the config's data.image_size, the model's pretrained_cfg, "
                             "else 3 224 224)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--config", help="a run config (configs/*.yaml): its lut, model and data sections are used")
    parser.add_argument("--subvec-len", type=int, help="V (overrides the config)")
    parser.add_argument("--num-codebooks", type=int, help="C (overrides the config)")
    parser.add_argument("--num-prototypes", type=int, help="K (overrides the config)")
    parser.add_argument("--convert-all", action="store_true",
                        help="also convert the stem and classifier (kept dense by default)")
    parser.add_argument("--per-layer", action="store_true", help="add per-layer tables")
    parser.add_argument("--output", help="also write the Markdown to this file")
    return parser


def _resolve(args: argparse.Namespace) -> tuple[str, nn.Module, LUTConfig, tuple[int, ...] | None]:
    """Model, LUT config and input size: command line over ``--config`` (read by the pipeline's config reader)."""
    from ..pipeline.config import ModelConfig, parse_config, read_config
    from ..pipeline.models import create_model

    raw = read_config(args.config) if args.config else {}
    cfg = parse_config(raw, str(args.config or "<defaults>"))
    try:
        config = cfg.lut_config()
    except LUTConfigError as err:
        raise LUTConfigError(f"{args.config}: {err}") from None
    file_model = isinstance(raw.get("model"), dict) and "name" in raw["model"]
    from_file = file_model and args.model in (None, cfg.model.name)
    if not from_file and args.model is None:
        raise ValueError("give --model NAME (or a --config with model.name)")
    model_cfg = cfg.model if from_file else ModelConfig(source=args.source or "timm", name=args.model)
    if args.source:
        model_cfg.source = args.source
    try:
        dense = create_model(model_cfg, num_classes=1000)
    except Exception as err:  # noqa: BLE001 - third-party constructors raise anything
        raise ValueError(f"--model {model_cfg.name!r}: {first_line(err)}") from None
    if args.subvec_len is not None or args.num_codebooks is not None:
        config.subvec_len = config.num_codebooks = None
    cli = {"subvec_len": args.subvec_len, "num_codebooks": args.num_codebooks, "num_prototypes": args.num_prototypes}
    changes = {k: v for k, v in cli.items() if v is not None}
    if changes:
        config = LUTConfig.from_dict({**vars(config), **changes}, where="command line")
    input_size = args.input_size
    if input_size is None and from_file and "image_size" in (raw.get("data") or {}):
        input_size = (cfg.model.kwargs.get("in_chans", 3), cfg.data.image_size, cfg.data.image_size)
    return model_cfg.name, dense, config, input_size


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    name, input_size = args.model, args.input_size
    try:
        name, model, config, input_size = _resolve(args)
        dense, lut = profile_pair(model, config, input_size, args.batch_size, not args.convert_all, name=name)
    except ValueError as err:  # LUTConfigError is a ValueError
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (RuntimeError, AssertionError) as err:  # e.g. an input size the model rejects
        print(f"error: forward of {name!r} on input {input_size} failed: {first_line(err)}", file=sys.stderr)
        return 2
    text = "\n\n".join([compare_markdown([dense, lut])]
                       + ([layers_markdown(dense), layers_markdown(lut)] if args.per_layer else []))
    emit(text, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
