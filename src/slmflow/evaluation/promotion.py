"""Gated promotion: an alias moves to a version only when every quality gate holds."""

from __future__ import annotations

import operator
import re
from collections.abc import Callable
from dataclasses import dataclass

from slmflow.errors import SlmflowError
from slmflow.evaluation import EvalReport, evaluate, find_eval_run
from slmflow.evaluation.data import load_eval_set

_OPERATORS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    ">": operator.gt,
    "<": operator.lt,
    "==": operator.eq,
}
_GATE = re.compile(r"^\s*([A-Za-z_][\w./]*)\s*(>=|<=|==|>|<)\s*(-?\d+(?:\.\d+)?(?:[eE]-?\d+)?)\s*$")


@dataclass(frozen=True)
class Gate:
    metric: str
    op: str
    threshold: float

    @classmethod
    def parse(cls, text: str) -> Gate:
        match = _GATE.match(text)
        if not match:
            raise SlmflowError(f"cannot read gate {text!r}; write it like 'accuracy>=0.9'")
        return cls(match.group(1), match.group(2), float(match.group(3)))

    def check(self, metrics: dict[str, float]) -> str | None:
        """None if the gate holds, else why it failed."""
        if self.metric not in metrics:
            return f"gate {self} failed: the evaluation has no metric {self.metric!r} (it has {', '.join(sorted(metrics))})"
        value = metrics[self.metric]
        if not _OPERATORS[self.op](value, self.threshold):
            return f"gate {self} failed: {self.metric} = {value:.4g}"
        return None

    def no_worse(self, new: float, current: float) -> bool:
        """Whether `new` is at least as good as `current`, in the direction this gate prefers."""
        return new <= current if self.op in ("<", "<=") else new >= current

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.threshold:g}"


@dataclass(frozen=True)
class PromotionResult:
    promoted: bool
    failures: list[str]
    metrics: dict[str, float]
    eval_run_id: str
    current_version: str | None


def promote(
    name: str,
    version: str,
    alias: str,
    gates: list[Gate],
    data: str,
    *,
    no_worse_than_current: bool = False,
) -> PromotionResult:
    """Evaluate `name/version` (or reuse a matching evaluation) and move `alias` if every gate holds."""
    from slmflow.registry import set_alias

    if not gates and not no_worse_than_current:
        raise SlmflowError("give at least one --gate or --no-worse-than-current")
    gates = gates or [Gate("accuracy", ">=", 0.0)]
    report = measure(name, version, data)
    failures = [why for gate in gates if (why := gate.check(report.metrics))]
    current = _current_version(name, alias)
    if no_worse_than_current and current and current != version:
        baseline = measure(name, current, data)
        failures += _regressions(gates, report.metrics, baseline.metrics, current)
    if not failures:
        set_alias(name, alias, version)
    return PromotionResult(not failures, failures, report.metrics, report.run_id, current)


def measure(name: str, version: str, data: str) -> EvalReport:
    """The evaluation of `name/version` on `data`: reused when one exists, else run now."""
    eval_set = load_eval_set(data)
    return find_eval_run(name, version, eval_set.digest) or evaluate(f"models:/{name}/{version}", data)


def _regressions(gates: list[Gate], new: dict[str, float], current: dict[str, float], version: str) -> list[str]:
    failures = []
    for gate in gates:
        if gate.metric in new and gate.metric in current and not gate.no_worse(new[gate.metric], current[gate.metric]):
            failures.append(
                f"{gate.metric} = {new[gate.metric]:.4g} is worse than the current version {version}'s "
                f"{current[gate.metric]:.4g}"
            )
    return failures


def _current_version(name: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        return str(MlflowClient().get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None
