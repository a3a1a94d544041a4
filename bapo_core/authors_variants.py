"""The clip-bound search with the settings of the authors' released code (github.com/WooooDyy/BAPO),
as the `bapo_authors_code` preset (configs/policy_loss/bapo_authors_code.yaml) runs it.

Where bapo_core/clip_search.py follows the paper, each of these settings may differ:
    search_order="low_first"  c_low moves first, then c_high (ClipPath orders the path; the sums are the same)
    accounting="value"        clipped tokens count at their clamped value: A * c_high above c_high,
                              |A| * c_low below c_low (the literal reading of Eq. 8)
    rho_definition="ratio"    rho = P / (N + 1e-8), inf when N <= 0 (`rho_value`; the sums are the same)
    clamp_last_step=True      each step is min(current + step, max): a last grid value equal to the max,
                              closer than one step, may follow the uniform grid
    dual_clip_c=c             with accounting="gradient", A<0 tokens with r > c carry no gradient and do
                              not count in N; with accounting="value" the dual clip acts in the loss only
`variant_path_sums` returns the same vector as `paper_path_sums` (and equals it on the paper's settings);
`path_contributions` calls it for every spec that is not the paper's.
"""

from __future__ import annotations

from typing import Optional

import torch

from .clip_search import grid_count, grid_tensor, token_terms
from .spec import ClipPath, ClipSearchSpec


def grid_position(r: torch.Tensor, grid: tuple[float, ...], step: float, strict: bool, off_grid_last: bool) -> torch.Tensor:
    """`grid_count` for a grid that may end with a clamped last value closer than one step
    (`off_grid_last`, clamp_last_step): the uniform part, plus one comparison with that last value."""
    count = grid_count(r, grid[:-1] if off_grid_last else grid, step, strict)
    if off_grid_last:
        last = grid_tensor(grid, r.dtype, r.device)[-1]
        count.add_(r > last if strict else r >= last)
    return count


def variant_path_sums(
    ratio: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    spec: ClipSearchSpec,
    weights: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """`paper_path_sums` for any spec: float64 (H + L + 1,) [P per c_high | N per c_low | signal tokens]. No host sync."""
    path = ClipPath.from_spec(spec)
    H, L = len(path.c_high_grid), len(path.c_low_grid)
    r, wa, num_signal = token_terms(ratio, advantages, mask, weights)

    first_high_step = grid_position(r, path.c_high_grid, spec.c_high_step, True, path.high_off_grid_last)
    low_steps = grid_position(r, path.c_low_grid, spec.c_low_step, False, path.low_off_grid_last)
    negative = wa < 0
    bucket = torch.where(wa > 0, first_high_step, low_steps.add_(H + 1)).long()
    mass = wa.abs_()  # |w A|
    if spec.dual_clip_c is not None and spec.accounting == "gradient":  # dual-clipped negatives carry no gradient
        mass.masked_fill_((r > spec.dual_clip_c) & negative, 0.0)

    def bucket_sums(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-bucket sums of `values`: (H + 1,) over the positives' buckets, (L + 1,) over the negatives'."""
        sums = torch.zeros(H + 1 + L + 1, dtype=torch.float64, device=r.device).index_add_(0, bucket, values)
        return sums[: H + 1], sums[H + 1 :]

    def at_or_below(buckets: torch.Tensor) -> torch.Tensor:  # entry i: buckets 0..i
        return buckets[:-1].cumsum(0)

    def above(buckets: torch.Tensor) -> torch.Tensor:  # entry j: buckets j+1..end
        return buckets[1:].flip(0).cumsum(0).flip(0)

    if spec.accounting == "value":  # tokens clipped at a bound count at it: A * c_high above, |A| * c_low below
        pos_mass, neg_mass = bucket_sums(mass)
        pos_clipped = above(pos_mass) * grid_tensor(path.c_high_grid, torch.float64, r.device)
        neg_clipped = at_or_below(neg_mass) * grid_tensor(path.c_low_grid, torch.float64, r.device)
    positive, negative_sums = bucket_sums(mass.mul_(r))  # r |w A| per bucket
    p = at_or_below(positive)  # positives with r <= c_high_i
    n = above(negative_sums)  # negatives with r >= c_low_j
    if spec.accounting == "value":
        p, n = p + pos_clipped, n + neg_clipped
    return torch.cat([p, n, num_signal])
