"""Rule protocol and the pass that applies per-target rules to every PrimFunc (like s_tir.dlight)."""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

import tvm
from tvm import tirx


class ScheduleRule:
    """``apply(func, target) -> s_tir.Schedule | None``: None when the rule does not match."""

    name = "rule"

    def apply(self, func: "tirx.PrimFunc", target: "tvm.target.Target"):  # pragma: no cover - interface
        raise NotImplementedError

    def __repr__(self):
        return f"{type(self).__name__}()"


def is_scheduled(func) -> bool:
    attrs = func.attrs
    return bool(attrs is not None and ("tirx.is_scheduled" in attrs and int(attrs["tirx.is_scheduled"])))


def apply_rules_to_func(func, target, rules: Sequence[ScheduleRule], log: Optional[list] = None, name: str = ""):
    """First matching rule's schedule (as a scheduled PrimFunc), or None."""
    for rule in rules:
        try:
            sch = rule.apply(func, target)
        except Exception as e:  # a rule that fails to schedule falls through to the next one
            if log is not None:
                log.append((name, rule.name, f"failed: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"))
            continue
        if sch is None:
            continue
        if log is not None:
            log.append((name, rule.name, "ok"))
        return sch.mod["main"].with_attr("tirx.is_scheduled", True)
    if log is not None:
        log.append((name, None, "unscheduled"))
    return None


@tvm.transform.module_pass(opt_level=0, name="SigeApplyScheduleRules")
class ApplyScheduleRules:
    """Module pass: apply ``rules`` to every unscheduled PrimFunc (first match wins)."""

    def __init__(self, target, rules: Iterable[ScheduleRule], log: Optional[list] = None):
        self.target = target
        self.rules = list(rules)
        self.log = log

    def transform_module(self, mod, _ctx):
        updated = {}
        for gv, func in mod.functions_items():
            if isinstance(func, tirx.PrimFunc) and not is_scheduled(func):
                new = apply_rules_to_func(func, self.target, self.rules, self.log, gv.name_hint)
                if new is not None:
                    updated[gv] = new
        for gv, func in updated.items():
            mod[gv] = func
        return mod
