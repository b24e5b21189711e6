"""The LUT inference path multiplies no activation by a dense weight, on CPU, in an
exported graph (what TensorRT compiles), and on CUDA when one is present."""
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import lutnn
from lutnn.layers import native

aten = torch.ops.aten
MATMUL_OPS = {aten.mm, aten.addmm, aten.bmm, aten.baddbmm, aten.matmul, aten.linear, aten.einsum,
              aten.convolution, aten._convolution, aten.mv, aten.addmv, aten.dot}


class MatmulRecorder(TorchDispatchMode):
    """Records every matmul-family aten call with the storages of its tensor operands."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[object, list[int]]] = []
        self.ops: list[object] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket)
        if func.overloadpacket in MATMUL_OPS:
            ptrs = [a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)]
            self.calls.append((func.overloadpacket, ptrs))
        return func(*args, **(kwargs or {}))


@pytest.fixture(autouse=True)
def eager_encode(monkeypatch):
    """Record the eager ops: what an exported graph and CUDA run. On CPU the native encoder
    replaces the distance ``baddbmm`` with one call the dispatcher cannot see (it reads the
    prototypes, never a weight)."""
    monkeypatch.setitem(native._state, "lib", None)


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _model() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 10),
    )
    lutnn.convert_(net)
    for layer in lutnn.lut_layers(net).values():
        with torch.no_grad():
            layer.prototypes.normal_()
    return net.eval()


def _record(model: nn.Module, x: torch.Tensor) -> MatmulRecorder:
    with torch.no_grad():
        model(x)  # builds the cached tables (the one-off P @ W precompute)
        with MatmulRecorder() as rec:
            model(x)
    return rec


def _assert_lookup_only(model: nn.Module, rec: MatmulRecorder) -> None:
    layers = list(lutnn.lut_layers(model).values())
    weights = {_storage(layer.weight) for layer in layers}
    prototypes = {_storage(layer.prototypes) for layer in layers}
    for op, ptrs in rec.calls:
        assert not weights & set(ptrs), f"{op} reads a LUT layer's dense weight"
    encode = [ptrs for op, ptrs in rec.calls if op is aten.baddbmm and prototypes & set(ptrs)]
    assert len(encode) == len(layers), "one distance baddbmm (encode) per LUT layer"
    bags = sum(op in (aten._embedding_bag, aten._embedding_bag_forward_only) for op in rec.ops)
    assert bags == len(layers), "one gather-accumulate per LUT layer"


@pytest.mark.parametrize("int8", [False, True])
def test_lut_forward_has_no_dense_matmul(int8):
    model = _model()
    if int8:
        lutnn.quantize_tables_(model)
    rec = _record(model, torch.randn(2, 3, 8, 8))
    _assert_lookup_only(model, rec)
    assert {op for op, _ in rec.calls} == {aten.baddbmm}


def test_recorder_sees_dense_matmuls_in_dense_mode():
    """Control: the same check does flag x @ W when the layers run dense."""
    model = lutnn.set_mode(_model(), "dense")
    rec = _record(model, torch.randn(2, 3, 8, 8))
    weights = {_storage(layer.weight) for layer in lutnn.lut_layers(model).values()}
    hits = [op for op, ptrs in rec.calls if weights & set(ptrs)]
    assert len(hits) == 4 and aten.convolution in hits


def test_timm_vit_lut_layers_run_lookups_only():
    from lutnn.tools.profile import dense_and_lut

    _, model = dense_and_lut("deit_tiny_patch16_224", img_size=32, depth=2)
    assert len(lutnn.lut_layers(model)) == 2 * 4  # qkv, proj, fc1, fc2 per block; stem and head dense
    _assert_lookup_only(model, _record(model, torch.randn(1, 3, 32, 32)))


def _input_dependent(gm: torch.fx.GraphModule, user_inputs: set[str]) -> set[torch.fx.Node]:
    dep = set()
    for node in gm.graph.nodes:
        if node.name in user_inputs or any(a in dep for a in node.all_input_nodes):
            dep.add(node)
    return dep


@pytest.mark.parametrize("int8", [False, True])
def test_exported_graph_matches_eager_and_multiplies_inputs_only_by_prototypes(int8):
    """torch.export (TensorRT's front end) traces the LUT model; the only matmul that touches
    the activations is the encode distance. Tables are a parameter-only subexpression."""
    model = _model()
    if int8:
        lutnn.quantize_tables_(model)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        ref = model(x)
        ep = torch.export.export(model, (x,))
        torch.testing.assert_close(ep.module()(x), ref)
    user = set(ep.graph_signature.user_inputs)
    dep = _input_dependent(ep.graph_module, user)
    matmuls = [n for n in ep.graph_module.graph.nodes if n.op == "call_function"
               and getattr(n.target, "overloadpacket", None) in MATMUL_OPS]
    assert matmuls, "the graph has no matmul at all?"
    on_inputs = [n.target.overloadpacket for n in matmuls if n in dep]
    assert on_inputs == [aten.baddbmm] * 4
    assert sum(getattr(n.target, "overloadpacket", None) is aten.embedding_bag
               for n in ep.graph_module.graph.nodes) == 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible to torch)")
@pytest.mark.parametrize("int8", [False, True])
def test_lut_model_runs_on_cuda_like_on_cpu(int8):
    model = _model()
    if int8:
        lutnn.quantize_tables_(model)
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        ref = model(x)
        model.cuda()
        out = model(x.cuda())
    assert out.is_cuda
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-4, atol=1e-4)
    _assert_lookup_only(model, _record(model, x.cuda()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible to torch)")
def test_init_prototypes_runs_the_torch_engine_on_the_models_gpu(monkeypatch):
    import importlib

    km = importlib.import_module("lutnn.kmeans")  # the module; lutnn.kmeans is the function
    seen = []
    engine = km._BACKENDS["torch"]
    monkeypatch.setitem(km._BACKENDS, "torch", lambda x, *a: seen.append(x.device.type) or engine(x, *a))
    model = _model().cuda()
    rows = lutnn.capture_rows(model, [torch.randn(16, 3, 8, 8) for _ in range(2)], device="cuda")
    assert all(r.device.type == "cpu" for r in rows.values())  # captured rows live on the host
    reports = lutnn.init_prototypes(model, rows, backend="torch", niter=10)
    assert seen == ["cuda"] * len(reports) == ["cuda"] * 4
    assert all(r.error_kmeans < r.error_random and r.seconds > 0 for r in reports)
