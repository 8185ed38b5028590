"""The planner's peak against the real trainer's, on a generated matrix of configs (not the
presets): every policy, accumulation, vocabularies, tied/untied embeddings, dims 64-2048.
Real CPU tensors, MemTracker over real Trainer.train_step() calls (bigtrain.planner.simulate)."""

from __future__ import annotations

import pytest

from bigtrain import planner as P  # noqa: F401  (import order: the planner before bigtrain.job)
from bigtrain.planner.measure import MATRIX, matrix_config, measured_peak, planned


@pytest.mark.slow
@pytest.mark.parametrize("case", list(MATRIX))
def test_predicted_peak_within_2_percent_of_the_real_trainer(case, tiny_data, tmp_path):
    cfg = matrix_config(case, str(tiny_data), str(tmp_path / "run"))
    est = planned(cfg)
    real = measured_peak(cfg, steps=2)
    assert abs(est.peak - real["Total"]) <= 0.02 * real["Total"], (case, est.policy, est.peak, real)
    if real["host pool"]:  # offload: the pool's whole chunks dominate; the rest must agree too
        assert est.host_pinned == real["host pool"]
        rest_pred, rest_real = est.peak - est.host_pinned, real["Total"] - real["host pool"]
        assert abs(rest_pred - rest_real) <= 0.02 * rest_real, (case, rest_pred, rest_real)
