"""Whole-model CPU compile of a (converted, retrained) model with TVM Relax.

Route: ``torch.export`` -> ``relax.frontend.torch.from_exported_program`` -> compile.
Before export every ``LUTLinear`` is swapped for a shim that calls one custom op,
``lutnn::lut_rows(rows, protos_t, pnorm, table, scale, bias)``, and every ``LUTConv2d``
for one that calls ``lutnn::lut_conv2d`` (NCHW in, NCHW out, :mod:`.conv` kernels), so
the exported graph keeps each LUT layer as a single node; ``custom_convert_map`` turns
that node into two ``call_tir``s of the LUT kernels (encode, read-accumulate), with the
tuned knobs when the tuning database has them. Everything else is imported by the stock frontend,
legalised to TIR, fused, and scheduled by :func:`schedules.schedule_generic`, or on request
(``ms_trials``) by MetaSchedule (:mod:`.metaschedule`). The
dense model goes through the identical pipeline (without shims) as a fair baseline.

Shapes are static: a compiled model serves one batch size (pad the last batch).
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
import tvm
from torch import Tensor, nn
from tvm import relax
from tvm.relax.frontend.torch import from_exported_program
from tvm.target import Target

from ..layers import LUTConv2d, LUTLinear
from ..layers import functional as LF
from . import metaschedule
from .conv import ConvEncodeSpec, ConvGeometry, ConvLookupSpec, conv_constants, table_dtype
from .kernels import EncodeSpec, KernelSpec, LookupSpec
from .schedules import Knobs, default_knobs, schedule_generic, scheduled
from .shuffle import prepare_table
from .tuning import TuningDatabase, default_tuning_dir


@torch.library.custom_op("lutnn::lut_rows", mutates_args=())
def lut_rows(rows: Tensor, protos_t: Tensor, pnorm: Tensor, table: Tensor, scale: Tensor, bias: Tensor) -> Tensor:
    """``[N, D] -> [N, M]`` LUT product; int8 ``table`` means ``y = scale * sum + bias``."""
    codes = LF.encode(rows, protos_t.transpose(1, 2))
    acc = LF.table_lookup(codes, table.to(rows.dtype))
    return (acc * scale if table.dtype == torch.int8 else acc) + bias


@lut_rows.register_fake
def _(rows, protos_t, pnorm, table, scale, bias):
    return rows.new_empty(rows.shape[0], table.shape[2])


class _LUTLinearShim(nn.Module):
    """What export sees instead of a ``LUTLinear``: one ``lutnn::lut_rows`` call."""

    def __init__(self, layer: LUTLinear) -> None:
        super().__init__()
        p = layer.prototypes.detach()
        q = layer.quantized_table
        if q is not None:
            table, scale = q.values, q.scale
        else:
            table, scale = layer.table().detach(), torch.ones(layer.out_features)
        bias = layer.bias if layer.bias is not None else torch.zeros(layer.out_features)
        self.out_features = layer.out_features
        for name, t in (("protos_t", p.transpose(1, 2)), ("pnorm", p.pow(2).sum(-1)), ("table", table),
                        ("scale", scale), ("bias", bias)):
            self.register_buffer(name, t.detach().contiguous().clone())

    def forward(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, x.shape[-1])
        y = torch.ops.lutnn.lut_rows(rows, self.protos_t, self.pnorm, self.table, self.scale, self.bias)
        return y.reshape(*x.shape[:-1], self.out_features)


@torch.library.custom_op("lutnn::lut_conv2d", mutates_args=())
def lut_conv2d(x: Tensor, protos_m2: Tensor, pnorm: Tensor, table: Tensor, scale: Tensor, bias: Tensor,
               kernel_size: list[int], stride: list[int], padding: list[int], dilation: list[int]) -> Tensor:
    """NCHW ``LUTConv2d`` with the :func:`.conv.conv_constants` arguments (``protos_m2 = -2 P^T``)."""
    b, h_out, w_out = x.shape[0], *_conv_out_hw(x.shape, kernel_size, stride, padding, dilation)
    rows = F.unfold(x, kernel_size, dilation, padding, stride).transpose(1, 2).reshape(-1, protos_m2.shape[0]
                                                                                      * protos_m2.shape[1])
    y = lut_rows(rows, protos_m2 * -0.5, pnorm, table, scale, bias)
    return y.reshape(b, h_out * w_out, -1).transpose(1, 2).reshape(b, -1, h_out, w_out)


@lut_conv2d.register_fake
def _(x, protos_m2, pnorm, table, scale, bias, kernel_size, stride, padding, dilation):
    return x.new_empty(x.shape[0], table.shape[2], *_conv_out_hw(x.shape, kernel_size, stride, padding, dilation))


def _conv_out_hw(x_shape, kernel_size, stride, padding, dilation) -> tuple[int, int]:
    return tuple((x_shape[2 + i] + 2 * padding[i] - dilation[i] * (kernel_size[i] - 1) - 1) // stride[i] + 1
                 for i in range(2))


class _LUTConv2dShim(nn.Module):
    """What export sees instead of a ``LUTConv2d``: one ``lutnn::lut_conv2d`` call."""

    def __init__(self, layer: LUTConv2d) -> None:
        super().__init__()
        for name, t in conv_constants(layer, table_dtype(layer)).items():
            self.register_buffer(name, t)
        self.geometry = [list(layer.kernel_size), list(layer.stride), list(layer.padding), list(layer.dilation)]

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.lutnn.lut_conv2d(x, self.protos_m2, self.pnorm, self.table, self.scale, self.bias,
                                          *self.geometry)


SHIMS: dict[type[nn.Module], type[nn.Module]] = {LUTLinear: _LUTLinearShim, LUTConv2d: _LUTConv2dShim}


def exportable(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with LUT layers replaced by export shims (tables frozen as they are now)."""
    model = copy.deepcopy(model).eval()
    for name, module in list(model.named_modules()):
        if type(module) in SHIMS:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, SHIMS[type(module)](module))
    return model


@dataclass
class _LUTConverter:
    """``custom_convert_map`` entries: ``lutnn::lut_rows`` / ``lutnn::lut_conv2d`` -> encode +
    read-accumulate ``call_tir``s."""

    target: Target
    db: TuningDatabase | None
    kernels: dict[KernelSpec, tvm.ir.GlobalVar] = field(default_factory=dict)

    def _knobs(self, spec: KernelSpec, gather_only: bool) -> Knobs:
        return (self.db.knobs(spec, self.target, gather_only=gather_only) if self.db else None) or default_knobs(
            spec, self.target, gather_only=gather_only)

    def _gvar(self, importer, spec: KernelSpec, gather_only: bool = True) -> tvm.ir.GlobalVar:
        if spec not in self.kernels:
            func = scheduled(spec, self.target, self._knobs(spec, gather_only))
            # already scheduled, never fused into neighbours (op_pattern 8 = kOpaque)
            func = func.with_attrs({"global_symbol": spec.name, "op_pattern": 8})
            self.kernels[spec] = importer.block_builder.add_func(func, spec.name)
        return self.kernels[spec]

    def __call__(self, node, importer) -> relax.Var:
        rows, protos_t, pnorm, table, scale, bias = importer.retrieve_args(node)
        n, d = (int(s) for s in rows.ty.shape)
        c, v, k = (int(s) for s in protos_t.ty.shape)
        m = int(table.ty.shape[2])
        dtype = str(table.ty.dtype)
        bb = importer.block_builder
        enc = EncodeSpec(n, c, k, v)
        codes = bb.emit(relax.call_tir(self._gvar(importer, enc), [rows, protos_t, pnorm],
                                       relax.TensorType((n, c), "uint8")))
        look = LookupSpec(n, c, k, m, dtype)
        # a constant table can be repacked for the in-register shuffle kernels (as accelerate_ does);
        # conv tables and non-constant ones stay [C, K, M], which the gather kernels read
        constant = isinstance(table, tvm.ir.expr.Constant)
        kernel = self._knobs(look, gather_only=not constant).kernel
        if kernel != "gather":
            table = relax.const(prepare_table(table.value.numpy(), kernel))
        args = [codes, table, bias] if dtype == "float32" else [codes, table, scale, bias]
        return bb.emit(relax.call_tir(self._gvar(importer, look, gather_only=not constant), args,
                                      relax.TensorType((n, m), "float32")))

    def conv2d(self, node, importer) -> relax.Var:
        x, protos_m2, pnorm, table, scale, bias, kernel, stride, padding, dilation = importer.retrieve_args(node)
        b, cin, h, w = (int(s) for s in x.ty.shape)
        c, v, k = (int(s) for s in protos_m2.ty.shape)
        geom = ConvGeometry(b, cin, h, w, *(tuple(int(i) for i in a) for a in (kernel, stride, padding, dilation)))
        enc = ConvEncodeSpec(geom, c, k, v)
        look = ConvLookupSpec.of(enc, int(table.ty.shape[2]), str(table.ty.dtype))
        bb = importer.block_builder
        codes = bb.emit(relax.call_tir(self._gvar(importer, enc), [x, protos_m2, pnorm],
                                       relax.TensorType((b, c, geom.grid_q), "uint8")))
        y = bb.emit(relax.call_tir(self._gvar(importer, look), [codes, table, scale, bias],
                                   relax.TensorType((b, look.m, look.pixels), "float32")))
        return bb.emit(relax.op.reshape(y, (b, look.m, look.out_h, look.out_w)))


def import_model(model: nn.Module, example: Tensor, target: Target, db: TuningDatabase | None = None,
                 ) -> tuple[tvm.IRModule, list[KernelSpec]]:
    """Relax module of ``model`` at ``example``'s (static) shape, plus the LUT kernel specs it calls."""
    converter = _LUTConverter(target, db)
    with torch.no_grad():
        ep = torch.export.export(exportable(model), (example,))
    mod = from_exported_program(ep, custom_convert_map={"lut_rows.default": converter,
                                                        "lut_conv2d.default": converter.conv2d})
    return mod, list(converter.kernels)


def lut_kernel_specs(model: nn.Module, example: Tensor) -> list[KernelSpec]:
    """The kernel shapes a compiled ``model`` needs (to tune them before compiling)."""
    _, specs = import_model(model, example, Target({"kind": "llvm"}))
    return specs


@dataclass(frozen=True)
class MetaScheduleOptions:
    """MetaSchedule for the non-LUT functions: ``trials`` per function lacking a record (0: apply
    records only), database under ``tuning_dir`` (:func:`.metaschedule.database_dir`)."""

    trials: int
    tuning_dir: Path


def _schedule_rest(options: MetaScheduleOptions | None, applied: list[str]) -> tvm.transform.Pass:
    """Schedule every TIR function that is not a (pre-scheduled) LUT kernel: the MetaSchedule
    record where ``options`` is given, the database has one and it beats the hand schedule
    (:func:`.metaschedule.beats_hand`; names appended to ``applied``), else
    :func:`schedules.schedule_generic`."""

    @tvm.transform.module_pass(opt_level=0, name="lutnn.ScheduleRest")
    def schedule_rest(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        target = Target.current()
        funcs = metaschedule.tunable(mod)
        work_dir = metaschedule.database_dir(options.tuning_dir, target) if options else None
        db = metaschedule.tune_functions(funcs, target, work_dir, options.trials) if options else None
        out = tvm.IRModule(mod.functions, mod.type_definitions if hasattr(mod, "type_definitions") else None)
        for gv, func in mod.functions_items():
            if gv.name_hint in funcs:
                hand = schedule_generic(func, target)
                tuned = metaschedule.lookup(db, func, target) if db is not None else None
                if tuned is not None and metaschedule.beats_hand(work_dir, func, tuned, hand, target):
                    applied.append(gv.name_hint)
                    hand = tuned
                out[gv] = hand
        return out

    return schedule_rest


@relax.expr_functor.mutator
class _FastGelu(relax.PyExprMutator):
    """``nn.gelu`` as ``x/2 * (1 + fast_erf(x/sqrt 2))``: the stock lowering calls scalar
    libm ``erff`` per element, which made GELU the slowest op of a small ViT."""

    def visit_call_(self, call):
        if isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.nn.gelu":
            return self.builder_.call_te(
                lambda x: x * 0.5 * (1.0 + tvm.topi.fast_erf(x * 0.7071067811865476)), call.args[0],
                primfunc_name_hint="fast_gelu")
        return super().visit_call_(call)


@tvm.transform.module_pass(opt_level=0, name="lutnn.FastGelu")
def _fast_gelu(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    mutator = _FastGelu(mod)
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            mutator.builder_.update_func(gv, mutator.visit_expr(func))
    return mutator.builder_.get()


def _fuse_passes(target: Target) -> list[tvm.transform.Pass]:
    """Relax graph rewrites, legalisation to TIR and fusion: what produces the functions to schedule."""
    return ([_fast_gelu, relax.transform.FastMathTransform(),
             # channels last (weights HWIO): the dense convs (stem, patch embedding) become register-tiled
             # GEMMs over output channels; NCHW tiles pixels and reads strided inputs
             relax.transform.ConvertLayout({"relax.nn.conv2d": ["NHWC", "HWIO"]}),
             relax.transform.EliminateCommonSubexpr()]  # ConvertLayout transposes a tensor back once per use
            + relax.backend.cpu_generic.pipeline.library_dispatch_passes(target)
            + [relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(), relax.transform.FoldConstant(),
               relax.transform.FuseOps(), relax.transform.FuseTIR()])


def _pipeline(target: Target, ms_options: MetaScheduleOptions | None = None,
              ms_applied: list[str] | None = None) -> tvm.transform.Pass:
    cpu = relax.backend.cpu_generic.pipeline
    return tvm.transform.Sequential(
        _fuse_passes(target) + [_schedule_rest(ms_options, ms_applied if ms_applied is not None else [])]
        + cpu.dataflow_lower_passes(target) + cpu.finalize_passes(target))


def fused_functions(model: nn.Module, example: Tensor, target: Target) -> dict[str, tvm.tirx.PrimFunc]:
    """The unscheduled non-LUT TIR functions of ``model`` compiled at ``example``'s shape: what
    ``schedule_generic`` or MetaSchedule (``compile_model(..., ms_trials=N)``) schedules."""
    mod, _ = import_model(model.eval(), example, target)
    with target:
        return metaschedule.tunable(tvm.transform.Sequential(_fuse_passes(target))(mod))


class CompiledModel:
    """A model compiled by TVM for one input shape; call it with a torch tensor."""

    def __init__(self, mod: tvm.IRModule, target: Target, input_shape: tuple[int, ...],
                 kernels: list[KernelSpec], ms_options: MetaScheduleOptions | None = None) -> None:
        self.input_shape, self.kernels, self.target = tuple(input_shape), kernels, target
        self.ms_scheduled: list[str] = []  # functions compiled with a MetaSchedule record
        with target:
            self.executable = relax.build(mod, target=target,
                                          relax_pipeline=_pipeline(target, ms_options, self.ms_scheduled))
        self.device = tvm.cpu()
        self.vm = relax.VirtualMachine(self.executable, self.device)

    def run(self, x: np.ndarray) -> np.ndarray:
        out = self.vm["main"](tvm.runtime.tensor(np.ascontiguousarray(x, dtype=np.float32), self.device))
        while not hasattr(out, "numpy"):  # the torch importer returns a tuple of outputs
            out = out[0]
        return out.numpy()

    def profile(self, x: Tensor, calls: int = 5, clock: Callable[[], float] = time.perf_counter,
                ) -> dict[str, tuple[int, float]]:
        """Time per compiled function over ``calls`` forwards, slowest first: name -> (calls per
        forward, ms per forward). Layers of one shape share a function (DeiT's 12 ``layer_norm``
        calls); the VM's builtins (``vm.builtin.alloc_tensor``) are listed too."""
        spent: dict[str, list] = {}
        start = [0.0]

        def instrument(func, name, before, ret, *args):
            if before:
                start[0] = clock()
            else:
                entry = spent.setdefault(name, [0, 0.0])
                entry[0] += 1
                entry[1] += clock() - start[0]
            return 0  # VMInstrumentReturnKind.NO_OP

        arg = tvm.runtime.tensor(np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32), self.device)
        self.vm["main"](arg)
        self.vm.set_instrument(instrument)
        try:
            for _ in range(calls):
                self.vm["main"](arg)
        finally:
            self.vm.set_instrument(lambda *a: 0)
        return {k: (n // calls, t / calls * 1e3) for k, (n, t) in sorted(spent.items(), key=lambda kv: -kv[1][1])}

    def __call__(self, x: Tensor) -> Tensor:
        if tuple(x.shape) != self.input_shape:
            raise ValueError(f"compiled for input shape {self.input_shape}, got {tuple(x.shape)}")
        return torch.from_numpy(self.run(x.detach().cpu().numpy()))


def compile_model(model: nn.Module, example: Tensor, target: Target, db: TuningDatabase | None = None,
                  ms_trials: int | None = None, tuning_dir: str | Path | None = None) -> CompiledModel:
    """Compile ``model`` (LUT or dense) for CPU at ``example``'s shape.

    ``ms_trials``: None (default) schedules the non-LUT functions by hand
    (:func:`schedules.schedule_generic`) and reads no MetaSchedule database; 0 compiles every
    function the database under ``tuning_dir`` (default :func:`.tuning.default_tuning_dir`) has
    a record for with that record, tuning nothing (a deployment build never starts a search);
    N > 0 first tunes, N trials each, the functions without a record. A record is used only
    where it runs faster than the hand schedule (timed once per record, the verdict cached next
    to the database); the other functions keep the hand schedule. Records are applied only on
    request, so the default build never depends on what a database holds.
    """
    if ms_trials is not None and ms_trials < 0:
        raise ValueError(f"ms_trials must be None or >= 0, got {ms_trials}")
    options = (MetaScheduleOptions(ms_trials, Path(tuning_dir or default_tuning_dir()))
               if ms_trials is not None else None)
    mod, kernels = import_model(model.eval(), example, target, db)
    return CompiledModel(mod, target, tuple(example.shape), kernels, options)
