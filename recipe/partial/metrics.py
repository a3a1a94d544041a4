"""``partial/trained/*`` metrics of one step's trained trajectories, from their ``extra_fields``.

Per trajectory: ``partial_segments`` = ``[[version, n_tokens, engine_weight_version], ...]``. Trained at
step ``t`` means the policy being updated is version ``t - 1``; a token from version ``v`` is
``(t - 1) - v`` versions stale. Names avoid "max"/"min" except where verl should reduce with max
(``.../max``): verl reduces keys containing those words with max/min across mini-batches.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np


def trained_metrics(keys: list[str], extras: list[dict], global_steps: int) -> dict[str, float]:
    """Share resumed, segments / distinct versions per trajectory, token staleness, group version span."""
    segments = [e.get("partial_segments") or [] for e in extras]
    if not segments:
        return {}
    versions = [len({s[0] for s in segs}) for segs in segments]
    counts = [len(segs) for segs in segments]
    weights = np.array([s[1] for segs in segments for s in segs], dtype=float)
    lags = np.array([(global_steps - 1) - s[0] for segs in segments for s in segs], dtype=float)
    group_versions: dict[str, list[int]] = defaultdict(list)
    for key, segs in zip(keys, segments, strict=True):
        group_versions[key.split("_")[0]] += [s[0] for s in segs]
    spans = [max(v) - min(v) + 1 for v in group_versions.values() if v]
    out = {
        "partial/trained/resumed_share": float(np.mean([v > 1 for v in versions])),
        "partial/trained/versions/mean": float(np.mean(versions)),
        "partial/trained/versions/max": float(max(versions)),
        "partial/trained/segments/mean": float(np.mean(counts)),
        "partial/trained/segments/max": float(max(counts)),
        "partial/trained/forced_share": float(np.mean([bool(e.get("partial_forced")) for e in extras])),
        "partial/trained/lifted_share": float(np.mean([bool(e.get("partial_lifted_versions")) for e in extras])),
        "partial/trained/restored_share": float(np.mean([bool(e.get("partial_restored")) for e in extras])),
        "partial/trained/group_version_span/max": float(max(spans)) if spans else 0.0,
    }
    if weights.sum() > 0:
        out["partial/trained/token_staleness/mean"] = float((weights * lags).sum() / weights.sum())
        out["partial/trained/token_staleness/max"] = float(lags.max())
    return out

