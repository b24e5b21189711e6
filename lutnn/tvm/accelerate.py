"""LUT layers of a PyTorch model run as compiled TVM kernels, in place (torchao ``quantize_`` style)::

    report = lutnn.tvm.accelerate_(model)      # model: converted, eval
    y = model(x)                               # LUT layers: TVM encode + read-accumulate
    lutnn.tvm.unaccelerate_(model)             # back to the eager forward

Only the LUT layers change (plus, by default, ``nn.MaxPool2d``: PyTorch's NCHW max-pool is a
scalar loop that cost ResNet-18 more than its LUT encodes, :mod:`.pool`); attention, norms
and activations stay PyTorch. Each layer's ``forward`` is overridden on the instance (undo
deletes the override, so the class forward returns exactly). Per input shape a layer gets a *runner* from :data:`RUNNERS` (keyed by
layer type): a closure over pre-built kernels, its frozen tables and a preallocated codes
buffer. Kernels are shape-specialised and cached by kernel spec, so the 12 blocks of a ViT
share 8 kernels per token count; the tuning database is consulted for every new shape.
Tensors go to the kernels as ``torch.Tensor`` (DLPack, zero copy).

* An eval ``BatchNorm2d`` that alone consumes a LUT conv's output (found by ``torch.fx``) is
  folded into that conv's epilogue and skipped (``fold_bn``; 19 of ResNet-18's 20 BatchNorms).
* Eval + lut mode only: in training (``ste``), ``soft`` or ``dense`` mode the eager forward runs.
* ``torch.compile``: inside a traced graph the layer is one ``lutnn::accelerated_lut`` custom op.
* ``copy.deepcopy`` of an accelerated model gives an accelerated copy with its own tables.
* Tables are frozen when a shape is first seen and refrozen when prototypes, weight or the
  int8 tables change (checked by tensor version per call).
"""
from __future__ import annotations

import importlib
import itertools
import math
import types
import warnings
import weakref
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch
from torch import Tensor, nn
from tvm.target import Target

from ..layers import LUTBase, LUTConv2d, LUTLinear
from .kernels import EncodeSpec, KernelSpec, LookupSpec
from .target import host_target, set_num_threads
from .tuning import TuningDatabase, build_kernel, tune_kernels

Runner = Callable[[Tensor], Tensor]


class RunnerFactory(Protocol):
    def __call__(self, layer: LUTBase, x_shape: tuple[int, ...], *, target: Target | None = None,
                 db: TuningDatabase | None = None, tune_trials: int = 0) -> Runner: ...


# layer type -> runner factory (or "module:function", imported on first use)
RUNNERS: dict[type[nn.Module], RunnerFactory | str] = {}


def register_runner(layer_type: type[nn.Module], factory: RunnerFactory | str) -> None:
    """Make ``accelerate_`` run layers of exactly ``layer_type`` through ``factory`` (a type
    that is not a LUT layer is a non-LUT op, run when ``AccelerateConfig.non_lut_ops``)."""
    RUNNERS[layer_type] = factory


def _resolve(layer_type: type) -> RunnerFactory:
    """The factory for ``layer_type``; raises ``LookupError`` with the reason when there is none."""
    factory = RUNNERS.get(layer_type)
    if factory is None:
        raise LookupError(f"no TVM runner for {layer_type.__name__} (register one with register_runner)")
    if isinstance(factory, str):
        module, name = factory.split(":")
        try:
            factory = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as e:
            raise LookupError(f"no TVM runner for {layer_type.__name__} ({factory}: {e})") from None
        RUNNERS[layer_type] = factory
    return factory


# -- kernels -----------------------------------------------------------------------------
_KERNELS: dict[tuple, Callable] = {}


def kernel(spec: KernelSpec, target: Target, db: TuningDatabase | None = None):
    """``build_kernel`` cached by (spec, target, tuned knobs): layers of one shape share a kernel."""
    knobs = db.knobs(spec, target) if db is not None else None
    key = (spec, str(target), knobs)
    if key not in _KERNELS:
        _KERNELS[key] = build_kernel(spec, target, db)
    return _KERNELS[key]


def _tuned(specs: list[KernelSpec], target: Target, db: TuningDatabase | None, tune_trials: int,
           ) -> TuningDatabase | None:
    if tune_trials <= 0:
        return db
    return tune_kernels(specs, target, db.path.parent if db is not None else None, tune_trials)


def _aligned(x: Tensor) -> Tensor:
    """Contiguous fp32 with a 64-byte aligned start: the kernels' buffers assume TVM's
    default alignment and use aligned vector loads (a sliced view crashes them)."""
    if x.dtype != torch.float32:
        x = x.float()
    if x.data_ptr() & 63 or not x.is_contiguous():
        x = torch.empty(x.shape).copy_(x)  # fresh CPU allocations are 64-byte aligned
    return x


def frozen_tables(layer: LUTBase) -> tuple[Tensor, ...]:
    """``(protos_t [C,V,K], pnorm [C,K], table [C,K,M], scale [M], bias [M])`` as the kernels
    take them; ``table`` is int8 when the layer has int8 tables (``scale`` is then used)."""
    with torch.no_grad():
        p = layer.prototypes.detach().float()
        q = layer.quantized_table
        if q is not None:
            if q.granularity != "output":
                raise NotImplementedError(f"int8 tables with granularity {q.granularity!r} "
                                          "(the kernels support 'output')")
            table, scale = q.values, q.scale
        else:
            table, scale = layer.table().detach(), torch.ones(layer.out_features)
        bias = layer.bias_or_none()
        bias = torch.zeros(layer.out_features) if bias is None else bias.detach()
        return tuple(t.float().contiguous().clone() if t.dtype != torch.int8 else t.contiguous().clone()
                     for t in (p.transpose(1, 2), p.pow(2).sum(-1), table, scale, bias))


ENCODE_ROW_STEP = 16  # encode puts rows in vector lanes (2-3x faster) only for N % lanes == 0


def encoder(n: int, d: int, c: int, k: int, v: int, target: Target, db: TuningDatabase | None,
            ) -> Callable[[Tensor, Tensor, Tensor, Tensor], None]:
    """``(rows [n, d], protos_t, pnorm, codes [n, c]) -> None``; a token count like 197 runs as
    192 rows in vector lanes plus a 5-row tail kernel, not as one slow k-vectorised kernel."""
    tail = n % ENCODE_ROW_STEP
    whole = kernel(EncodeSpec(n, c, k, v), target, db)
    if not tail or n < ENCODE_ROW_STEP or d % 2:  # d odd: the tail rows would start misaligned
        return whole
    main = n - tail
    enc_main, enc_tail = kernel(EncodeSpec(main, c, k, v), target, db), kernel(EncodeSpec(tail, c, k, v), target, db)
    direct = main * c % 64 == 0  # the tail's codes can be written in place (aligned start)
    tail_codes = None if direct else torch.empty(tail, c, dtype=torch.uint8)

    def run(rows: Tensor, protos_t: Tensor, pnorm: Tensor, codes: Tensor) -> None:
        enc_main(rows[:main], protos_t, pnorm, codes[:main])
        if direct:
            enc_tail(rows[main:], protos_t, pnorm, codes[main:])
        else:
            enc_tail(rows[main:], protos_t, pnorm, tail_codes)
            codes[main:].copy_(tail_codes)

    return run


def encode_specs(n: int, c: int, k: int, v: int) -> list[EncodeSpec]:
    """The encode kernels :func:`encoder` builds for ``n`` rows (what to tune)."""
    tail = n % ENCODE_ROW_STEP
    if not tail or n < ENCODE_ROW_STEP:
        return [EncodeSpec(n, c, k, v)]
    return [EncodeSpec(n - tail, c, k, v), EncodeSpec(tail, c, k, v)]


def linear_runner(layer: LUTLinear, x_shape: tuple[int, ...], *, target: Target | None = None,
                  db: TuningDatabase | None = None, tune_trials: int = 0) -> Runner:
    """``x [..., D] -> y [..., M]`` for inputs of shape ``x_shape``: encode + read-accumulate."""
    target = target or host_target(torch.get_num_threads())
    n, d, m = math.prod(x_shape[:-1]), layer.in_features, layer.out_features
    c, k, v = layer.num_codebooks, layer.num_prototypes, layer.subvec_len
    protos_t, pnorm, table, scale, bias = frozen_tables(layer)
    look_spec = LookupSpec(n, c, k, m, "int8" if table.dtype == torch.int8 else "float32")
    db = _tuned([*encode_specs(n, c, k, v), look_spec], target, db, tune_trials)
    enc, look = encoder(n, d, c, k, v, target, db), kernel(look_spec, target, db)
    # the shuffle kernels read their own table layout (a no-op for gather); fresh torch storage is 64-byte aligned
    prepared = torch.from_numpy(np.ascontiguousarray(look.prepare_table(table)))
    table = torch.empty(prepared.shape, dtype=prepared.dtype).copy_(prepared)
    codes = torch.empty(n, c, dtype=torch.uint8)  # scratch: consumed within the call
    out_shape = (*x_shape[:-1], m)
    tail = (table, scale, bias) if table.dtype == torch.int8 else (table, bias)

    def run(x: Tensor) -> Tensor:
        enc(_aligned(x.reshape(n, d)), protos_t, pnorm, codes)
        y = torch.empty(n, m)
        look(codes, *tail, y)
        return y.view(out_shape)

    run.codes = codes  # the last call's codes (for checks against the PyTorch encoder)
    return run


register_runner(LUTLinear, linear_runner)
register_runner(LUTConv2d, "lutnn.tvm.conv:conv_runner")
register_runner(nn.MaxPool2d, "lutnn.tvm.pool:max_pool_runner")


def output_shape(layer: LUTBase, x_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The output shape of ``layer`` for inputs of ``x_shape`` (what the fake op returns)."""
    if isinstance(layer, LUTConv2d):
        return (x_shape[0], layer.out_channels, *layer.output_size(x_shape[2], x_shape[3]))
    return (*x_shape[:-1], layer.out_features)


# -- per-layer state and the forward override ---------------------------------------------
@dataclass(eq=False)
class _Accelerated:
    """One accelerated layer: its runners per input shape and what they were built from."""

    name: str
    layer_ref: weakref.ref
    factory: RunnerFactory
    target: Target
    db: TuningDatabase | None
    tune_trials: int
    runners: dict[tuple, Runner | None] = field(default_factory=dict)  # None: shape failed, eager
    state: tuple = ()

    @staticmethod
    def state_of(layer: nn.Module) -> tuple:
        if not isinstance(layer, LUTBase):  # a non-LUT op (max-pool): nothing frozen
            return ()
        # the parameters themselves: weight_2d() of a conv is a new view object on every call, whose id
        # would read as "changed" and rebuild the runners on every forward
        w = layer.weight
        bn = _folded_bn(layer)
        bn_state = None if bn is None else tuple((t._version, id(t)) for t in _bn_tensors(bn)) + (bn.eps,)
        return (layer.prototypes._version, id(layer.prototypes), w._version, id(w), id(layer._qtable), bn_state)

    def runner(self, layer: LUTBase, shape: tuple) -> Runner | None:
        state = self.state_of(layer)
        if state != self.state:  # parameters or tables changed: refreeze every shape
            self.runners.clear()
            self.state = state
        fn = self.runners.get(shape, False)
        if fn is False:
            bn = _folded_bn(layer)
            post = {} if bn is None else {"post": _bn_affine(bn)}
            try:
                fn = self.factory(layer, shape, target=self.target, db=self.db, tune_trials=self.tune_trials, **post)
            except (NotImplementedError, ValueError) as e:
                warnings.warn(f"{self.name}: stays PyTorch for input shape {shape}: {e}", stacklevel=3)
                fn = None
            self.runners[shape] = fn
        return fn


_LAYERS: dict[int, _Accelerated] = {}
_next_handle = itertools.count()


@torch.library.custom_op("lutnn::accelerated_lut", mutates_args=())
def accelerated_lut(x: Tensor, handle: int) -> Tensor:
    """The accelerated layer ``handle`` as one opaque op (what ``torch.compile`` graphs hold)."""
    acc = _LAYERS[handle]
    layer = acc.layer_ref()
    fn = acc.runner(layer, tuple(x.shape))
    return fn(x) if fn is not None else _eager(layer, x)


@accelerated_lut.register_fake
def _(x: Tensor, handle: int) -> Tensor:
    layer = _LAYERS[handle].layer_ref()
    if not isinstance(layer, LUTBase):  # a non-LUT op: its own forward on fake tensors gives the shape
        return type(layer).forward(layer, x)
    return x.new_empty(output_shape(layer, tuple(x.shape)))


def _attach(layer: LUTBase, acc: _Accelerated) -> None:
    handle = next(_next_handle)
    _LAYERS[handle] = acc
    weakref.finalize(layer, _LAYERS.pop, handle, None)
    # a bound method: deepcopy rebinds it to the copy, which _forward then gives its own state
    layer.forward = types.MethodType(_forward, layer)
    layer._lutnn_accelerated = handle


def _forward(layer: nn.Module, x: Tensor) -> Tensor:
    if isinstance(layer, LUTBase) and layer.effective_mode() != "lut":
        return type(layer).forward(layer, x)
    if torch.compiler.is_compiling():
        return torch.ops.lutnn.accelerated_lut(x, layer._lutnn_accelerated)
    acc = _LAYERS[layer._lutnn_accelerated]
    if acc.layer_ref() is not layer:  # a deep copy of an accelerated layer: same config, own tables
        _attach(layer, replace(acc, layer_ref=weakref.ref(layer), runners={}, state=()))
        acc = _LAYERS[layer._lutnn_accelerated]
    fn = acc.runners.get(x.shape) if acc.state == acc.state_of(layer) else None
    if fn is None:
        fn = acc.runner(layer, tuple(x.shape))
        if fn is None:
            return _eager(layer, x)
    return fn(x)


def _eager(layer: nn.Module, x: Tensor) -> Tensor:
    """The class forward, plus the folded BatchNorm (skipped in the model) where there is one."""
    y = type(layer).forward(layer, x)
    bn = _folded_bn(layer) if isinstance(layer, LUTBase) else None
    return y if bn is None else type(bn).forward(bn, y)


# -- BatchNorm folding ---------------------------------------------------------------------
def _bn_tensors(bn: nn.BatchNorm2d) -> list[Tensor]:
    return [t for t in (bn.running_mean, bn.running_var, bn.weight, bn.bias) if t is not None]


def _bn_affine(bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """``(a, b)`` with ``bn(y) = a[:, None, None] * y + b[:, None, None]`` in eval."""
    with torch.no_grad():
        a = torch.rsqrt(bn.running_var.float() + bn.eps)
        if bn.weight is not None:
            a = a * bn.weight.float()
        b = -bn.running_mean.float() * a
        return a, b if bn.bias is None else b + bn.bias.float()


def _folded_bn(conv: LUTBase) -> nn.BatchNorm2d | None:
    """The BatchNorm folded into ``conv``'s kernels, when it is in eval (a training BN runs itself)."""
    bn = conv.__dict__.get("_lutnn_fold_bn")
    return bn if bn is not None and not bn.training else None


def _bn_forward(bn: nn.BatchNorm2d, x: Tensor) -> Tensor:
    conv = bn.__dict__["_lutnn_folded_into"]
    if not bn.training and is_accelerated(conv) and conv.effective_mode() == "lut":
        return x  # the conv's kernels (or _eager) applied it
    return type(bn).forward(bn, x)


def following_batchnorms(model: nn.Module) -> dict[str, str]:
    """LUT conv name -> the ``BatchNorm2d`` (eval statistics) that is the only consumer of its output,
    from a ``torch.fx`` trace with LUT layers as leaves; ``{}`` when the model does not trace."""

    class _Tracer(torch.fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return isinstance(m, LUTBase) or super().is_leaf_module(m, qualname)

    try:
        graph = _Tracer().trace(model)
    except Exception:  # noqa: BLE001 - data-dependent control flow etc.: nothing is folded
        return {}
    modules = dict(model.named_modules())
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    pairs = {}
    for node in graph.nodes:
        bn = modules.get(node.target) if node.op == "call_module" else None
        if type(bn) is not nn.BatchNorm2d or not bn.track_running_stats or len(node.args) != 1 or node.kwargs:
            continue
        src = node.args[0]
        if (isinstance(src, torch.fx.Node) and src.op == "call_module" and isinstance(modules[src.target], LUTConv2d)
                and len(src.users) == 1 and calls[src.target] == 1 and calls[node.target] == 1):
            pairs[src.target] = node.target
    return pairs


# -- public API ----------------------------------------------------------------------------
@dataclass
class AccelerateConfig:
    """``target``: default ``host_target(torch.get_num_threads())``; ``tuning_dir``: the tuning
    database (default ``$LUTNN_TVM_CACHE``); ``tune_trials > 0`` tunes each new kernel shape
    on first use (slow first call); ``threads``: TVM's thread pool size (default: torch's);
    ``non_lut_ops``: also run the registered non-LUT modules (``nn.MaxPool2d``) on TVM kernels;
    ``fold_bn``: fold each eval BatchNorm2d that only follows a LUT conv into that conv's kernels."""

    target: Target | None = None
    tuning_dir: str | Path | None = None
    tune_trials: int = 0
    threads: int | None = None
    non_lut_ops: bool = True
    fold_bn: bool = True


@dataclass
class AccelerateReport:
    accelerated: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # layer name -> reason
    folded: dict[str, str] = field(default_factory=dict)  # BatchNorm name -> the LUT conv it is folded into

    def __str__(self) -> str:
        lines = [f"accelerated {len(self.accelerated)} layers with TVM kernels"]
        if self.folded:
            lines.append(f"  folded {len(self.folded)} BatchNorms into the LUT convs before them")
        lines += [f"  stays PyTorch: {name}: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


def accelerate_(model: nn.Module, config: AccelerateConfig | None = None) -> AccelerateReport:
    """Run every supported LUT layer of ``model`` through TVM kernels (in place; see module doc).

    Layers without a runner stay PyTorch, with a warning naming them. Calling it again
    re-accelerates (e.g. after a new config). Tables are frozen per layer and refrozen when a
    parameter's version or identity changes (optimiser steps, ``load_state_dict``); unlike the
    eager layer's table cache, edits through ``.data`` are not checksummed on this hot path:
    call ``accelerate_`` again after them.
    """
    config = config or AccelerateConfig()
    threads = config.threads or torch.get_num_threads()
    set_num_threads(threads)
    target = config.target or host_target(threads)
    db = TuningDatabase(config.tuning_dir)
    unaccelerate_(model)
    report = AccelerateReport()
    for name, layer in model.named_modules():
        if not isinstance(layer, LUTBase):
            if config.non_lut_ops and type(layer) in RUNNERS:
                _attach(layer, _Accelerated(name, weakref.ref(layer), _resolve(type(layer)), target, db, 0))
                report.accelerated.append(name)
            continue
        try:
            factory = _resolve(type(layer))
        except LookupError as e:
            report.skipped[name] = str(e)
            warnings.warn(f"{name}: stays PyTorch: {e}", stacklevel=2)
            continue
        _attach(layer, _Accelerated(name, weakref.ref(layer), factory, target, db, config.tune_trials))
        report.accelerated.append(name)
    modules = dict(model.named_modules())
    for conv_name, bn_name in (following_batchnorms(model) if config.fold_bn else {}).items():
        conv, bn = modules[conv_name], modules[bn_name]
        if is_accelerated(conv):
            conv.__dict__["_lutnn_fold_bn"], bn.__dict__["_lutnn_folded_into"] = bn, conv  # not submodules
            bn.forward = types.MethodType(_bn_forward, bn)
            report.folded[bn_name] = conv_name
    return report


def unaccelerate_(model: nn.Module) -> nn.Module:
    """Undo :func:`accelerate_`: every LUT layer runs its class's eager forward again."""
    for layer in model.modules():
        layer.__dict__.pop("_lutnn_fold_bn", None)
        if layer.__dict__.pop("_lutnn_folded_into", None) is not None:
            layer.__dict__.pop("forward", None)
        handle = layer.__dict__.pop("_lutnn_accelerated", None)
        if handle is not None:
            layer.__dict__.pop("forward", None)
            _LAYERS.pop(handle, None)
    return model


def is_accelerated(layer: nn.Module) -> bool:
    return "_lutnn_accelerated" in layer.__dict__
