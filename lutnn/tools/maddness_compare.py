"""MADDness vs the k-means/argmin encoder on real activations (a digits MLP): ``lutnn maddness``."""
from __future__ import annotations

import argparse
import copy
import sys
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from ..calibrate import init_prototypes
from ..convert import LUTConfig, convert
from ..kmeans import kmeans
from ..layers import functional as LF
from ..layers.base import resolve_codebooks
from ..maddness import HashTrees, MaddnessLinear, bucket_means, build_table_full

def _relative_error(exact: Tensor, approx: Tensor) -> float:
    return float((exact - approx).norm() / exact.norm().clamp_min(1e-30))


def random_hash_trees(x: Tensor, num_codebooks: int, levels: int, generator: torch.Generator) -> HashTrees:
    """Reference encoder: random split dimensions, thresholds drawn from the data's values."""
    xs = LF.split_subvectors(x, num_codebooks)  # [C, N, V]
    c, n, v = xs.shape
    width = 2 ** (levels - 1)
    dims = torch.randint(v, (c, levels), generator=generator)
    pick = torch.randint(n, (c, levels, width), generator=generator)
    thresholds = xs[torch.arange(c).view(c, 1, 1), pick, dims.unsqueeze(2).expand(c, levels, width)]
    return HashTrees(dims, thresholds)


@torch.no_grad()
def compare_encoders(
    fit_rows: Tensor,
    eval_rows: Tensor,
    weight: Tensor,
    subvec_len: int = 8,
    levels: int = 4,
    ridge: float = 1.0,
    seed: int = 0,
) -> dict[str, float]:
    """Held-out relative error ``||XW^T - LUT(X)|| / ||XW^T||`` of each encoder, ``K = 2**levels``."""
    gen = torch.Generator().manual_seed(seed)
    d = fit_rows.shape[1]
    c, _ = resolve_codebooks(d, None, subvec_len, "compare_encoders")
    k = 2 ** levels
    exact = eval_rows @ weight.T
    xs = LF.split_subvectors(fit_rows, c).contiguous()

    def argmin_error(protos: Tensor) -> float:
        return _relative_error(exact, LF.table_lookup(LF.encode(eval_rows, protos), LF.build_table(protos, weight)))

    def tree_error(trees: HashTrees, protos: Tensor) -> float:
        return _relative_error(exact, LF.table_lookup(trees.encode(eval_rows), build_table_full(protos, weight)))

    rand_trees = random_hash_trees(fit_rows, c, levels, gen)
    return {
        "random prototypes (argmin)": argmin_error(xs[:, torch.randint(len(fit_rows), (k,), generator=gen)]),
        "k-means (argmin, LUT-NN init)": argmin_error(kmeans(xs, k, niter=25, seed=seed, backend="torch")),
        "random hash trees + bucket means": tree_error(rand_trees, bucket_means(
            fit_rows, rand_trees.encode(fit_rows), k)),
        "MADDness (bucket means)": _relative_error(
            exact, MaddnessLinear.fit(fit_rows, weight, subvec_len=subvec_len, levels=levels)(eval_rows)),
        f"MADDness + ridge {ridge:g}": _relative_error(
            exact, MaddnessLinear.fit(fit_rows, weight, subvec_len=subvec_len, levels=levels, ridge=ridge)(eval_rows)),
    }


@dataclass
class DigitsMLP:
    """A 64-128-64-10 MLP trained on the ``fit`` half of sklearn's digits; ``held`` is held out."""

    mlp: nn.Sequential
    x: Tensor
    y: Tensor
    fit: Tensor
    held: Tensor

    @classmethod
    def train(cls, seed: int = 0, steps: int = 300) -> "DigitsMLP":
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
        y = torch.tensor(digits.target)
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
        fit, held = perm[: len(x) // 2], perm[len(x) // 2:]
        torch.manual_seed(seed)
        mlp = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))
        opt = torch.optim.Adam(mlp.parameters(), lr=1e-2)
        for _ in range(steps):
            opt.zero_grad()
            nn.functional.cross_entropy(mlp(x[fit]), y[fit]).backward()
            opt.step()
        return cls(mlp.eval(), x, y, fit, held)

    @torch.no_grad()
    def layer_rows(self) -> dict[str, Tensor]:
        """Input rows of every linear layer (``"0"``, ``"2"``, ``"4"``) for all images."""
        rows, h = {}, self.x
        for i, module in enumerate(self.mlp):
            if isinstance(module, nn.Linear):
                rows[str(i)] = h
            h = module(h)
        return rows

    @torch.no_grad()
    def accuracy(self, model: nn.Module) -> float:
        return float((model(self.x[self.held]).argmax(1) == self.y[self.held]).float().mean())


@torch.no_grad()
def digits_accuracy(digits: DigitsMLP, subvec_len: int = 8, levels: int = 4, ridge: float = 1.0,
                    seed: int = 0) -> dict[str, float]:
    """Held-out accuracy with every linear layer replaced (all fitted on dense-model rows of the fit half)."""
    rows = {name: r[digits.fit] for name, r in digits.layer_rows().items()}
    out = {"dense": digits.accuracy(digits.mlp)}
    lut, _ = convert(digits.mlp, LUTConfig(subvec_len=subvec_len, num_prototypes=2 ** levels))
    init_prototypes(lut, rows, backend="torch", seed=seed)
    out["k-means LUT"] = digits.accuracy(lut.eval())
    for label, r in (("MADDness", None), (f"MADDness + ridge {ridge:g}", ridge)):
        model = copy.deepcopy(digits.mlp)
        for name, x in rows.items():
            model[int(name)] = MaddnessLinear.from_linear(digits.mlp[int(name)], x, subvec_len=subvec_len,
                                                          levels=levels, ridge=r)
        out[label] = digits.accuracy(model)
    return out


def _markdown_row(cells: Sequence[object]) -> str:
    return "| " + " | ".join(f"{c:.4f}" if isinstance(c, float) else str(c) for c in cells) + " |"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="MADDness vs k-means/argmin encoders on the activations of a digits MLP: "
                    "held-out reconstruction error per layer, and accuracy with every layer replaced.",
    )
    parser.add_argument("--subvec-len", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--levels", type=int, default=4, help="tree depth; K = 2**levels prototypes")
    parser.add_argument("--ridge", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    digits = DigitsMLP.train(args.seed)
    rows = digits.layer_rows()
    errors, accuracy = [], []
    for v in args.subvec_len:
        for i, (name, x) in enumerate(rows.items()):
            err = compare_encoders(x[digits.fit], x[digits.held], digits.mlp[int(name)].weight, v,
                                   args.levels, args.ridge, args.seed)
            errors.append([f"fc{i + 1}", x.shape[1], v, *err.values()])
        acc = digits_accuracy(digits, v, args.levels, args.ridge, args.seed)
        accuracy.append([v, *acc.values()])
    print(_markdown_row(["layer", "D", "V", *err]))
    print("|---|---:|---:|" + "---:|" * len(err))
    print("\n".join(_markdown_row(r) for r in errors))
    print(f"\nRelative output error ||XW^T - LUT(X)|| / ||XW^T|| on {len(digits.held)} held-out digits "
          f"(K = {2 ** args.levels}, bias excluded); encoders fitted on the other {len(digits.fit)}.\n")
    print(_markdown_row(["V", *acc]))
    print("|---:|" + "---:|" * len(acc))
    print("\n".join(_markdown_row(r) for r in accuracy))
    print("\nHeld-out accuracy with all three linear layers replaced (no retraining).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
