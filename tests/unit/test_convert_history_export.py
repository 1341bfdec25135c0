"""Round trips of the history and export messages."""

from __future__ import annotations

from rl_service.core.models.run_exporters import ExportedModel
from rl_service.core.runs.history import Episode, HistoryPage
from rl_service.transport import convert


def test_history_page_round_trip() -> None:
    page = HistoryPage(run_id="run-x", total_episodes=10, offset=4,
                       episodes=[Episode(12.5, 12, 0.25, 100), Episode(-3.0, 7, 1.5, 107)])
    assert convert.history_page_from_proto(convert.history_page_to_proto(page)) == page


def test_exported_model_round_trip() -> None:
    model = ExportedModel(data=b"\x00\x01zip", filename="run-x.zip", format="sb3", model_timesteps=2048,
                          signature="stable-baselines3 zip")
    assert convert.exported_model_from_proto(convert.exported_model_to_proto(model)) == model
