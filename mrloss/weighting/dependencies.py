"""RegionDependencyHandler: damp a region type until the types it depends on are learned (cascade learning)."""

from __future__ import annotations

from typing import Mapping

from mrloss.weighting.common import LossTrackingTool, finite_number, reject_unknown_keys, true_or_false, with_defaults

DEFAULTS = {
    "cascade_learning": True,  # false: the handler changes nothing
    "region_dependencies": {},  # {"methodology": {"requires": ["definition"], "penalty_factor": 0.5}}
    "learned_threshold": 1.0,  # a type is learned while its EMA loss (nats/token) <= this
    "ema_decay": 0.9,
}
DEPENDENCY_DEFAULTS = {"requires": None, "penalty_factor": 0.5}


class RegionDependencyHandler(LossTrackingTool):
    """Multiply a dependent type's weights by its ``penalty_factor`` while any type it requires is not learned.

    A type is *learned* while the EMA (``ema_decay``) of its batch mean loss, fed through ``update``, is
    ``<= learned_threshold`` (default 1.0 nats/token, i.e. a geometric-mean probability >= 1/e on its tokens).
    A required type whose loss has not been seen yet counts as **not** learned: the dependent waits for
    evidence. The check follows the current EMA (a type whose loss rises above the threshold again
    re-activates the penalty); penalties are direct, not transitive, and applied once per dependent however
    many requirements are unmet. Unknown keys, a missing ``requires``, a ``penalty_factor`` outside [0, 1] and
    dependency cycles are errors at construction; a type named in the config but absent from the
    ``region_types`` given to ``adjust`` is an error there.
    """

    def __init__(self, config: Mapping | None = None) -> None:
        config = with_defaults(config, DEFAULTS, "region_dependencies")
        self.cascade_learning = true_or_false(config["cascade_learning"], "region_dependencies.cascade_learning")
        self.learned_threshold = finite_number(
            config["learned_threshold"], "region_dependencies.learned_threshold", low=0.0
        )
        super().__init__(config["ema_decay"], "region_dependencies")
        self.dependencies = _parse_dependencies(config["region_dependencies"])

    def is_learned(self, region_type: str) -> bool:
        """True once ``region_type`` has an EMA loss and it is ``<= learned_threshold``."""
        ema = self.ema.values.get(region_type)
        return ema is not None and ema <= self.learned_threshold

    def type_multipliers(self, region_types: list[str], epoch: int | None = None) -> dict[str, float]:
        """``penalty_factor`` for dependents with an unlearned requirement, 1.0 for every other type."""
        named = set(self.dependencies) | {r for requires, _ in self.dependencies.values() for r in requires}
        missing = sorted(named - set(region_types))
        if missing:
            raise ValueError(
                f"region_dependencies names region type(s) {missing} that are not in the data's "
                f"region types {list(region_types)}"
            )
        multipliers = {t: 1.0 for t in region_types}
        if self.cascade_learning:
            for dependent, (requires, penalty_factor) in self.dependencies.items():
                if not all(self.is_learned(r) for r in requires):
                    multipliers[dependent] = penalty_factor
        return multipliers


def _parse_dependencies(dependencies) -> dict[str, tuple[tuple[str, ...], float]]:
    """Validate ``{dependent: {"requires": [...], "penalty_factor": f}}`` and reject cycles."""
    if not isinstance(dependencies, Mapping):
        raise TypeError(f"region_dependencies.region_dependencies: expected a mapping, got {dependencies!r}")
    parsed = {}
    for dependent, spec in dependencies.items():
        where = f"region_dependencies.region_dependencies[{dependent!r}]"
        reject_unknown_keys(spec, DEPENDENCY_DEFAULTS, where)
        requires = spec.get("requires")
        if (
            isinstance(requires, str)
            or not isinstance(requires, (list, tuple))
            or not requires
            or not all(isinstance(r, str) for r in requires)
        ):
            raise ValueError(f"{where}.requires: expected a non-empty list of region type names, got {requires!r}")
        penalty = finite_number(
            spec.get("penalty_factor", DEPENDENCY_DEFAULTS["penalty_factor"]),
            f"{where}.penalty_factor",
            low=0.0,
            high=1.0,
        )
        parsed[str(dependent)] = (tuple(dict.fromkeys(requires)), penalty)
    _reject_cycles({d: requires for d, (requires, _) in parsed.items()})
    return parsed


def _reject_cycles(graph: dict[str, tuple[str, ...]]) -> None:
    """Depth-first search; raise ``ValueError`` showing the first cycle found (a self-dependency included)."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" after

    def visit(node: str, path: list[str]) -> None:
        if state.get(node) == "done":
            return
        if state.get(node) == "open":
            cycle = path[path.index(node) :] + [node]
            raise ValueError(f"region_dependencies: dependency cycle {' -> '.join(cycle)}")
        state[node] = "open"
        for required in graph.get(node, ()):
            visit(required, path + [node])
        state[node] = "done"

    for node in graph:
        visit(node, [])
