from __future__ import annotations

from tidegate.models.predictor import TransitionPredictor


def test_learns_transitions() -> None:
    predictor = TransitionPredictor()
    for _ in range(5):
        for model in ("a", "b", "c"):
            predictor.observe(model)
    assert predictor.predict("a")[0] == ("b", 1.0)
    assert predictor.predict("c")[0] == ("a", 1.0)
    predictor.observe("a")
    assert predictor.predict()[0][0] == "b"


def test_repeats_are_one_visit_and_frequency_is_the_fallback() -> None:
    predictor = TransitionPredictor()
    for model in ("x", "x", "x", "y"):
        predictor.observe(model)
    assert predictor.predict("x") == [("y", 1.0)]
    assert predictor.predict("y") == [("x", 0.75)]
    assert TransitionPredictor().predict() == []
