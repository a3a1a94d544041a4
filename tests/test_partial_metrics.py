"""``partial/trained/*`` metrics (recipe/partial/metrics.py) on hand-computed trajectories."""

import pytest

from recipe.partial.metrics import trained_metrics


def test_trained_metrics_by_hand():
    keys = ["u1_0_0", "u1_1_0", "u2_0_0"]
    extras = [
        {"partial_segments": [[0, 6, 1], [1, 4, 2]], "partial_forced": False},
        {"partial_segments": [[1, 5, 2]], "partial_forced": True, "partial_restored": True},
        {"partial_segments": [[2, 3, 3]], "partial_lifted_versions": [2]},
    ]
    m = trained_metrics(keys, extras, global_steps=3)  # trained at step 3: the policy updated is version 2
    assert m["partial/trained/resumed_share"] == pytest.approx(1 / 3)
    assert m["partial/trained/versions/mean"] == pytest.approx(4 / 3) and m["partial/trained/versions/max"] == 2
    assert m["partial/trained/segments/mean"] == pytest.approx(4 / 3)
    # token-weighted (t - 1) - v: 6 tokens x 2 + 4 x 1 + 5 x 1 + 3 x 0 over 18 tokens
    assert m["partial/trained/token_staleness/mean"] == pytest.approx(21 / 18)
    assert m["partial/trained/token_staleness/max"] == 2
    assert m["partial/trained/group_version_span/max"] == 2  # u1 spans versions 0..1
    assert m["partial/trained/forced_share"] == pytest.approx(1 / 3)
    assert m["partial/trained/restored_share"] == pytest.approx(1 / 3)
    assert m["partial/trained/lifted_share"] == pytest.approx(1 / 3)
