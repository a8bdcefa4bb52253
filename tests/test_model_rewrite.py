"""InferenceModelRewrite rules: precedence, weighted splits, and the CRD-shaped configuration."""

from __future__ import annotations

import random

import pytest
from pydantic import ValidationError

from scheduler.core.model_rewrite import ModelRewrites, RewriteRule, RewriteTarget
from scheduler.server.config import ServeConfig


def test_exact_matches_win_over_generic_rules_and_the_first_listed_over_later_ones() -> None:
    rewrites = ModelRewrites(
        [
            RewriteRule((), (RewriteTarget("default"),)),
            RewriteRule(("a", "b"), (RewriteTarget("a-v1"),)),
            RewriteRule(("a",), (RewriteTarget("a-v2"),)),
            RewriteRule((), (RewriteTarget("never"),)),
        ]
    )
    assert rewrites.rewrite("a", 0.5) == "a-v1"
    assert rewrites.rewrite("b", 0.5) == "a-v1"
    # The generic rule catches other names and requests naming no model.
    assert rewrites.rewrite("c", 0.5) == "default"
    assert rewrites.rewrite(None, 0.5) == "default"
    assert ModelRewrites([RewriteRule(("a",), (RewriteTarget("x"),))]).rewrite("c", 0.5) is None
    assert not ModelRewrites()


def test_weights_split_the_traffic_in_proportion() -> None:
    rewrites = ModelRewrites([RewriteRule(("m",), (RewriteTarget("v1", 90), RewriteTarget("v2", 10)))])
    assert rewrites.rewrite("m", 0.0) == "v1"
    assert rewrites.rewrite("m", 0.8999) == "v1"
    assert rewrites.rewrite("m", 0.9) == "v2"
    assert rewrites.rewrite("m", 0.999999) == "v2"
    rng = random.Random(7)
    picks = [rewrites.rewrite("m", rng.random()) for _ in range(20_000)]
    assert 0.88 < picks.count("v1") / len(picks) < 0.92


def test_rules_come_in_the_inference_model_rewrite_spec_shape() -> None:
    config = ServeConfig.model_validate(
        {
            "model_rewrites": [
                {
                    "matches": [{"model": {"type": "Exact", "value": "small-segment-lora"}}],
                    "targets": [
                        {"modelRewrite": "small-segment-lora-v1", "weight": 90},
                        {"modelRewrite": "small-segment-lora-v2", "weight": 10},
                    ],
                },
                {"matches": [], "targets": [{"modelRewrite": "Qwen/Qwen3-32B"}]},
            ]
        }
    )
    rules = [spec.rule() for spec in config.model_rewrites]
    assert rules[0] == RewriteRule(
        ("small-segment-lora",),
        (RewriteTarget("small-segment-lora-v1", 90), RewriteTarget("small-segment-lora-v2", 10)),
    )
    assert rules[1] == RewriteRule((), (RewriteTarget("Qwen/Qwen3-32B", 1),))


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ({"targets": [{"modelRewrite": "a", "weight": 1}, {"modelRewrite": "b"}]}, "every target"),
        ({"targets": []}, "at least 1"),
        ({"targets": [{"modelRewrite": "a", "weight": 0}]}, "greater than or equal to 1"),
        (
            {"matches": [{"model": {"type": "Prefix", "value": "a"}}], "targets": [{"modelRewrite": "a"}]},
            "Exact",
        ),
    ],
)
def test_malformed_rules_are_refused_with_the_reason(rule: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        ServeConfig.model_validate({"model_rewrites": [rule]})
