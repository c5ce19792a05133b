"""LoSiA (Wang et al., 2025, "Efficient High-Rank Fine-Tuning via Subnet Localization and Optimization").

Each targeted pretrained weight ``W`` (m x n) trains one sub-block directly, with no low-rank factors:
``k_row`` of its output rows by ``k_col`` of its input columns (the core subnet). Following LoSiA-Pro,
the sub-block is a trainable delta ``D`` (k_row x k_col) added into the selected output rows from the
selected input columns, ``y = W x + b; y[rows] += D x[cols]``, so backward computes only ``D``'s gradient
and the optimiser holds state for ``D`` alone.

Subnet localisation: while a layer is recording (its time slot, see
:class:`partial_lora.methods.losia.SubnetRelocalization`) the full gradient ``dW`` is formed from the
layer's input and output gradient, and the sensitivity ``|W * dW - (W * dW)^2 / 2|`` is smoothed as in
AdaLoRA: an exponential moving average ``I`` of it and one ``U`` of its deviation ``|s - I|``, both with
``beta``; the subnet score is ``I * U``. Re-localisation folds ``D`` into ``W``, then picks rows and
columns greedily: the best by block score of (top rows and top columns by their score sums), (top
rows, then the columns best on those rows) and (top columns, then the rows best on those columns).

Written here because PEFT has no LoSiA; the initial subnet is random, as in LoSiA's code, seeded by
(run seed, layer name).

Sizes: ``k = max(1, floor(p * size + 1/2))`` for ``size`` m (rows) and n (columns), i.e. ``p * size``
rounded half up; the trainable count of a layer is ``k_row * k_col``, which is ``p^2 * m * n`` whenever
``p * m`` and ``p * n`` are whole (all shapes of the configured backbones at ``p = 1/8``).
"""

from __future__ import annotations

import math

import torch
from torch.nn.functional import linear

from partial_lora.adapters.targets import ADAPTER, WeightDelta, targeted_linears, wrap_linears
from partial_lora.errors import SettingError
from partial_lora.masks import layer_generator


def subnet_size(size: int, rank_factor: float) -> int:
    """Rows (or columns) of the subnet: ``rank_factor * size`` rounded half up, at least 1."""
    return max(1, math.floor(rank_factor * size + 0.5))


def greedy_subnet(score: torch.Tensor, k_row: int, k_col: int) -> tuple[torch.Tensor, torch.Tensor]:
    """LoSiA's greedy localisation: sorted row and column indices of a ``k_row x k_col`` block of ``score``
    (m x n) with a large sum, the best of three greedy orders."""
    top_rows = score.sum(dim=1).topk(k_row).indices
    top_cols = score.sum(dim=0).topk(k_col).indices
    candidates = [
        (top_rows, top_cols),
        (top_rows, score[top_rows].sum(dim=0).topk(k_col).indices),
        (score[:, top_cols].sum(dim=1).topk(k_row).indices, top_cols),
    ]
    rows, cols = max(candidates, key=lambda pair: float(score[pair[0][:, None], pair[1]].sum()))
    return rows.sort().values, cols.sort().values


class SubnetLinear(WeightDelta):
    """A frozen linear layer whose ``rows x cols`` sub-block trains through ``delta`` (LoSiA-Pro's form).

    Re-localisation folds ``delta`` into the base weight, as LoSiA does; what was folded is also kept in
    ``folded`` (sparse: only the entries some subnet trained), so that :meth:`get_delta_weight` is the change
    from the pretrained weight over the whole run (Figures 7-10), not just the current subnet's.
    """

    def __init__(self, base_layer: torch.nn.Linear, rows: torch.Tensor, cols: torch.Tensor, beta: float) -> None:
        super().__init__(base_layer)
        weight = base_layer.weight
        self.register_buffer("rows", rows.to(weight.device))
        self.register_buffer("cols", cols.to(weight.device))
        self.delta_block = torch.nn.Parameter(torch.zeros(len(rows), len(cols), dtype=weight.dtype,
                                                          device=weight.device))
        self.folded = torch.sparse_coo_tensor(torch.empty(2, 0, dtype=torch.long), torch.empty(0), weight.shape,
                                              device=weight.device, check_invariants=True).coalesce()
        self.beta = beta
        self.recording = False
        self.sensitivity: torch.Tensor | None = None  # I: EMA of |W dW - (W dW)^2 / 2|
        self.uncertainty: torch.Tensor | None = None  # U: EMA of |sensitivity - I|

    def add_to(self, outputs: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        outputs = outputs.index_add(-1, self.rows, linear(inputs.index_select(-1, self.cols), self.delta_block))
        if self.recording and outputs.requires_grad:
            recorded = inputs.detach()
            outputs.register_hook(lambda grad: self._record(grad, recorded))
        return outputs

    def delta(self) -> torch.Tensor:
        """The current subnet's delta, in place in an m x n zero matrix."""
        weight = self.base_layer.weight
        return weight.new_zeros(weight.shape, dtype=self.delta_block.dtype).index_put(
            (self.rows[:, None], self.cols), self.delta_block)

    def get_delta_weight(self, adapter: str = ADAPTER) -> torch.Tensor:
        return self.folded.to_dense().to(self.delta_block.dtype) + self.delta()

    @torch.no_grad()
    def weight(self) -> torch.Tensor:
        """The weight this layer applies: ``W`` with the trained delta in its sub-block."""
        return self.base_layer.weight if self.merged else self.base_layer.weight + self.delta().to(
            self.base_layer.weight.dtype)

    @torch.no_grad()
    def _record(self, output_grad: torch.Tensor, inputs: torch.Tensor) -> None:
        # dW = sum over tokens of (output gradient) x (input): the full gradient LoSiA-Pro skips otherwise.
        weight_grad = (output_grad.reshape(-1, output_grad.shape[-1]).T.float()
                       @ inputs.reshape(-1, inputs.shape[-1]).float())
        product = self.weight().float() * weight_grad
        sensitivity = (product - product.square() / 2).abs()
        if self.sensitivity is None:
            self.sensitivity, self.uncertainty = torch.zeros_like(sensitivity), torch.zeros_like(sensitivity)
        self.sensitivity.mul_(self.beta).add_(sensitivity, alpha=1 - self.beta)
        self.uncertainty.mul_(self.beta).add_((sensitivity - self.sensitivity).abs(), alpha=1 - self.beta)

    @torch.no_grad()
    def relocalize(self) -> bool:
        """Fold the delta into ``W`` and move the subnet to the best-scored block; ``False`` (and nothing
        changes) when no sensitivity has been recorded since the last re-localisation."""
        if self.sensitivity is None:
            return False
        self.base_layer.weight.copy_(self.weight())
        block = torch.sparse_coo_tensor(torch.cartesian_prod(self.rows, self.cols).T,
                                        self.delta_block.detach().flatten().float(), self.folded.shape,
                                        check_invariants=True)
        self.folded = (self.folded + block).coalesce()
        self.delta_block.zero_()
        rows, cols = greedy_subnet(self.sensitivity * self.uncertainty, len(self.rows), len(self.cols))
        self.rows.copy_(rows)
        self.cols.copy_(cols)
        self.sensitivity = self.uncertainty = None
        return True


def apply_losia(model: torch.nn.Module, target_modules: str, rank_factor: float, beta: float,
                seed: int) -> dict[str, SubnetLinear]:
    """Freeze ``model`` and give each targeted linear layer a random initial subnet; returns the new layers."""
    if not 0 < rank_factor <= 1:
        raise SettingError("apply_losia", "rank_factor", "must lie in (0, 1]", rank_factor)
    if not 0 <= beta < 1:
        raise SettingError("apply_losia", "beta", "must lie in [0, 1)", beta)

    def wrap(name: str, module: torch.nn.Linear) -> SubnetLinear:
        generator = layer_generator(seed, name)
        out_features, in_features = module.weight.shape
        rows = torch.randperm(out_features, generator=generator)[:subnet_size(out_features, rank_factor)]
        cols = torch.randperm(in_features, generator=generator)[:subnet_size(in_features, rank_factor)]
        return SubnetLinear(module, rows.sort().values, cols.sort().values, beta)

    wrap_linears(model, targeted_linears(model, target_modules), wrap)
    return subnet_layers(model)


def subnet_layers(model: torch.nn.Module) -> dict[str, SubnetLinear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, SubnetLinear)}
