"""DynamicWeightAdjuster, RegionDependencyHandler, RegionWeighting: hand-computed multipliers, config errors,
exact resume from a state dict."""

import io
import json

import pytest
import torch

from mrloss.weighting import DynamicWeightAdjuster, RegionDependencyHandler, RegionWeighting

TYPES = ["concept", "definition", "methodology"]
# [B=2, T=5]; -1 = outside every region
TOKEN_WEIGHTS = torch.tensor([[0.0, 2.0, 1.5, 1.2, 1.0], [0.0, 2.0, 1.2, 0.7, 0.0]])
REGION_TYPE_IDS = torch.tensor([[-1, 0, 1, 2, -1], [-1, 0, 2, 1, -1]])


def expected_weights(multipliers: dict) -> torch.Tensor:
    """token_weights * multiplier of each token's type, element by element in float64."""
    out = TOKEN_WEIGHTS.double().clone()
    for index in range(out.numel()):
        type_id = int(REGION_TYPE_IDS.view(-1)[index])
        if type_id >= 0:
            out.view(-1)[index] *= multipliers[TYPES[type_id]]
    return out


ADJUSTER_CONFIG = {
    "difficulty_scaling": True,
    "epoch_weights": {"1": 1.0, "2": 1.2, "3": 1.5},
    "ema_decay": 0.5,
    "exponent": 2.0,
    "min_multiplier": 0.5,
    "max_multiplier": 1.8,
}


def test_adjuster_hand_computed():
    adjuster = DynamicWeightAdjuster(ADJUSTER_CONFIG)
    # no loss seen yet: only the epoch multiplier
    assert adjuster.type_multipliers(TYPES, 2) == {"concept": 1.2, "definition": 1.2, "methodology": 1.2}
    adjuster.update({"concept": 3.0, "definition": 1.0})
    adjuster.update({"concept": 1.0, "definition": 2.0, "methodology": None})  # None: absent from the batch
    # ema: concept 0.5*3 + 0.5*1 = 2, definition 0.5*1 + 0.5*2 = 1.5, methodology unseen -> 1.0
    # mean over seen = 1.75: concept (2/1.75)^2 = 64/49, definition (1.5/1.75)^2 = 36/49
    assert adjuster.ema.values == {"concept": 2.0, "definition": 1.5}
    got = adjuster.type_multipliers(TYPES, 1)
    assert got["concept"] == pytest.approx(64 / 49, abs=1e-12)
    assert got["definition"] == pytest.approx(36 / 49, abs=1e-12)
    assert got["methodology"] == 1.0
    adjuster.update({"methodology": 0.25})
    # mean = (2 + 1.5 + 0.25) / 3 = 1.25: concept 1.6^2 = 2.56 -> clamp 1.8; definition 1.2^2 = 1.44;
    # methodology 0.2^2 = 0.04 -> clamp 0.5; epoch 5 is past the last key: 1.5
    hand = {"concept": 1.8 * 1.5, "definition": 1.44 * 1.5, "methodology": 0.5 * 1.5}
    adjusted = adjuster.adjust(TOKEN_WEIGHTS, REGION_TYPE_IDS, TYPES, 5)
    assert adjusted.dtype == torch.float32 and adjusted.shape == TOKEN_WEIGHTS.shape
    torch.testing.assert_close(adjusted.double(), expected_weights(hand), rtol=0, atol=1e-6)
    assert adjuster.multipliers() == pytest.approx(hand, abs=1e-12)
    assert adjusted[0, 0] == 0 and adjusted[0, 4] == 1.0  # outside every region: unchanged
    assert TOKEN_WEIGHTS[0, 1] == 2.0  # input untouched


def test_adjuster_epoch_weights_before_first_and_after_last_key():
    adjuster = DynamicWeightAdjuster({"epoch_weights": {"2": 2.0, 4: 3.0}})
    assert [adjuster.epoch_multiplier(e) for e in (1, 2, 3, 4, 9)] == [1.0, 2.0, 2.0, 3.0, 3.0]
    adjuster.update({"concept": 5.0, "definition": 1.0})  # difficulty_scaling off: EMAs do not matter
    assert adjuster.type_multipliers(TYPES, 3) == {t: 2.0 for t in TYPES}
    with pytest.raises(ValueError, match="1-based"):
        adjuster.epoch_multiplier(0)
    with pytest.raises(ValueError, match="1-based"):
        adjuster.adjust(TOKEN_WEIGHTS, REGION_TYPE_IDS, TYPES, 1.5)


@pytest.mark.parametrize(
    "config, match",
    [
        ({"difficulty_scalling": True}, "unknown key"),
        ({"epoch_weights": {"first": 1.0}}, "epoch number"),
        ({"epoch_weights": {"0": 1.0}}, "epoch number"),
        ({"epoch_weights": {"1": -1.0}}, "outside"),
        ({"epoch_weights": {"1": 1.0, 1: 2.0}}, "twice"),
        ({"epoch_weights": {"2": {"concept": 0.0}}}, r"\['2'\]\['concept'\]: 0.0 is outside"),
        ({"min_multiplier": 2.0, "max_multiplier": 1.0}, "outside"),
        ({"ema_decay": 1.0}, "never update"),
        ({"difficulty_scaling": "yes"}, "true/false"),
    ],
)
def test_adjuster_config_errors(config, match):
    with pytest.raises((ValueError, TypeError), match=match):
        DynamicWeightAdjuster(config)


def test_per_type_epoch_weights_act_and_a_shared_factor_is_refused():
    """Before (#23 item 7): the shipped epoch_weights {"1": 1.0, "2": 1.2, "3": 1.5} scaled every region type alike,
    which cancels in Σw·l/Σw: runs with and without it gave the same loss while the logs showed 1.0 -> 1.5."""
    import mrloss

    shared = DynamicWeightAdjuster({"epoch_weights": {"1": 1.0, "3": 1.5}})
    per_type = DynamicWeightAdjuster({"epoch_weights": {"3": {"methodology": 1.5}}})
    assert per_type.type_multipliers(TYPES, 3) == {"concept": 1.0, "definition": 1.0, "methodology": 1.5}
    assert per_type.epoch_multiplier(2, "methodology") == 1.0 and per_type.epoch_multiplier(9, "methodology") == 1.5
    torch.manual_seed(0)
    hidden, weight = torch.randn(10, 8, dtype=torch.float64), torch.randn(11, 8, dtype=torch.float64)
    targets = torch.randint(0, 11, (10,))

    def loss(adjuster, epoch):
        weights = adjuster.adjust(TOKEN_WEIGHTS.double().view(-1), REGION_TYPE_IDS.view(-1), TYPES, epoch)
        weights[REGION_TYPE_IDS.view(-1) < 0] = 0.0  # no weighted token outside the regions
        return float(mrloss.linear_cross_entropy(hidden, weight, targets, weights, backend="torch"))

    assert loss(shared, 3) == pytest.approx(loss(shared, 1), rel=1e-12)  # a shared factor changes nothing
    assert abs(loss(per_type, 3) - loss(per_type, 1)) > 1e-3  # a per-type one does
    with pytest.raises(ValueError, match=r"^dynamic_weights.epoch_weights: every epoch scales all region types"):
        shared.check_epoch_weights_act(TYPES, weighted_outside=False)
    shared.check_epoch_weights_act(TYPES, weighted_outside=True)  # acts against weighted text outside the regions
    per_type.check_epoch_weights_act(TYPES, weighted_outside=False)
    with pytest.raises(ValueError, match=r"names region type\(s\) \['methodology'\] that are not in the data's"):
        per_type.check_epoch_weights_act(["concept", "definition"], weighted_outside=False)  # a typo, or other data
    both = DynamicWeightAdjuster({"epoch_weights": {"2": {"concept": 1.5, "definition": 1.5}}})
    with pytest.raises(ValueError, match="alike"):  # every type of this data scaled by the same factor
        both.check_epoch_weights_act(["concept", "definition"], weighted_outside=False)


def test_adjust_validates_tensors():
    adjuster = DynamicWeightAdjuster({})
    with pytest.raises(ValueError, match="shape"):
        adjuster.adjust(TOKEN_WEIGHTS, REGION_TYPE_IDS[:, :3], TYPES, 1)
    with pytest.raises(ValueError, match=r"region_type_ids\[0, 2\] = 3"):
        adjuster.adjust(TOKEN_WEIGHTS, torch.where(REGION_TYPE_IDS == 1, 3, REGION_TYPE_IDS), TYPES, 1)
    with pytest.raises(TypeError, match="integer"):
        adjuster.adjust(TOKEN_WEIGHTS, REGION_TYPE_IDS.float(), TYPES, 1)
    bf16 = adjuster.adjust(TOKEN_WEIGHTS.bfloat16(), REGION_TYPE_IDS, TYPES, 1)
    assert bf16.dtype == torch.bfloat16


HANDLER_CONFIG = {
    "cascade_learning": True,
    "learned_threshold": 1.0,
    "ema_decay": 0.5,
    "region_dependencies": {
        "methodology": {"requires": ["definition"], "penalty_factor": 0.5},
        "concept": {"requires": ["definition", "methodology"], "penalty_factor": 0.25},
    },
}


def test_handler_hand_computed():
    handler = RegionDependencyHandler(HANDLER_CONFIG)
    # nothing seen yet: requirements count as not learned
    assert handler.type_multipliers(TYPES) == {"concept": 0.25, "definition": 1.0, "methodology": 0.5}
    handler.update({"definition": 1.5, "methodology": 0.8})  # definition not learned (1.5 > 1)
    assert handler.type_multipliers(TYPES) == {"concept": 0.25, "definition": 1.0, "methodology": 0.5}
    handler.update({"definition": 0.3})  # ema 0.5*1.5 + 0.5*0.3 = 0.9 <= 1: learned
    adjusted = handler.adjust(TOKEN_WEIGHTS, REGION_TYPE_IDS, TYPES, 1)
    torch.testing.assert_close(adjusted, TOKEN_WEIGHTS, rtol=0, atol=0)
    assert handler.multipliers() == {"concept": 1.0, "definition": 1.0, "methodology": 1.0}
    handler.update({"methodology": 1.6})  # ema 0.5*0.8 + 0.5*1.6 = 1.2 > 1: concept waits again
    adjusted = handler.adjust(TOKEN_WEIGHTS, REGION_TYPE_IDS, TYPES, 1)
    torch.testing.assert_close(
        adjusted.double(), expected_weights({"concept": 0.25, "definition": 1.0, "methodology": 1.0}), rtol=0, atol=0
    )
    off = RegionDependencyHandler({**HANDLER_CONFIG, "cascade_learning": False})
    assert off.type_multipliers(TYPES) == {t: 1.0 for t in TYPES}


@pytest.mark.parametrize(
    "dependencies, match",
    [
        ({"a": {"requires": ["b"]}, "b": {"requires": ["c"]}, "c": {"requires": ["a"]}}, "cycle a -> b -> c -> a"),
        ({"a": {"requires": ["a"]}}, "cycle a -> a"),
        ({"a": {"requires": ["b"], "penalty": 0.5}}, "unknown key"),
        ({"a": {"penalty_factor": 0.5}}, "requires"),
        ({"a": {"requires": "b"}}, "requires"),
        ({"a": {"requires": ["b"], "penalty_factor": 1.5}}, "outside"),
    ],
)
def test_handler_config_errors(dependencies, match):
    with pytest.raises((ValueError, TypeError), match=match):
        RegionDependencyHandler({"region_dependencies": dependencies})


def test_handler_rejects_unknown_top_level_key_and_unknown_types():
    with pytest.raises(ValueError, match="unknown key"):
        RegionDependencyHandler({"cascade": True})
    handler = RegionDependencyHandler({"region_dependencies": {"methodology": {"requires": ["definiton"]}}})
    with pytest.raises(ValueError, match="definiton"):
        handler.adjust(TOKEN_WEIGHTS, REGION_TYPE_IDS, TYPES, 1)


def test_region_weighting_multiplies_both_tools():
    weighting = RegionWeighting.from_config({"dynamic_weights": ADJUSTER_CONFIG, "region_dependencies": HANDLER_CONFIG})
    weighting.update({"concept": 2.0, "definition": 0.5, "methodology": 1.5})
    # adjuster: mean 4/3 -> concept 1.5^2 = 2.25 -> 1.8, definition 0.375^2 -> 0.5, methodology 1.125^2 = 1.265625;
    # epoch 2: x1.2. handler: definition learned (0.5), methodology not (1.5): concept x0.25, methodology x1
    hand = {"concept": 1.8 * 1.2 * 0.25, "definition": 0.5 * 1.2, "methodology": 1.265625 * 1.2}
    adjusted = weighting.adjust(TOKEN_WEIGHTS, REGION_TYPE_IDS, TYPES, 2)
    torch.testing.assert_close(adjusted.double(), expected_weights(hand), rtol=0, atol=1e-6)
    assert weighting.multipliers() == pytest.approx(hand, abs=1e-12)

    off = RegionWeighting.from_config({"dynamic_weights": None, "region_dependencies": None})
    assert not off.enabled and torch.equal(off.adjust(TOKEN_WEIGHTS, REGION_TYPE_IDS, TYPES, 3), TOKEN_WEIGHTS)
    only_dependencies = RegionWeighting.from_config({"region_dependencies": HANDLER_CONFIG})
    assert only_dependencies.type_multipliers(TYPES, 1) == {"concept": 0.25, "definition": 1.0, "methodology": 0.5}
    with pytest.raises(ValueError, match="unknown key"):
        RegionWeighting.from_config({"dynamic_weight": {}})


def test_state_round_trip_resumes_exactly():
    section = {"dynamic_weights": ADJUSTER_CONFIG, "region_dependencies": HANDLER_CONFIG}
    generator = torch.Generator().manual_seed(0)
    losses = [dict(zip(TYPES, (torch.rand(3, generator=generator) * 2).tolist())) for _ in range(8)]
    weights = torch.rand(4, 7, generator=generator) * 2
    type_ids = torch.randint(-1, 3, (4, 7), generator=generator)

    def run(weighting, steps):
        out = []
        for step in steps:
            out.append(weighting.adjust(weights, type_ids, TYPES, 1 + step // 3))
            weighting.update(losses[step])
        return out

    straight = run(RegionWeighting.from_config(section), range(8))
    first = RegionWeighting.from_config(section)
    run(first, range(4))
    saved = io.BytesIO()
    torch.save(json.loads(json.dumps(first.state_dict())), saved)  # survives JSON and torch.save
    saved.seek(0)
    resumed = RegionWeighting.from_config(section)
    resumed.load_state_dict(torch.load(saved))
    for expected, got in zip(straight[4:], run(resumed, range(4, 8))):
        assert torch.equal(expected, got)
    assert len({tuple(t.flatten().tolist()) for t in straight}) > 3  # the weights did move
    with pytest.raises(ValueError, match="configured tools"):
        RegionWeighting.from_config({"dynamic_weights": {}}).load_state_dict(first.state_dict())
