"""Rules on measurement rows, and removing (or keeping) the instances they match.

``"npixels < 100 and circularity <= 0.7; area > 5000"``: groups separated by ``;`` are OR-ed,
the conditions of a group joined by ``and`` are AND-ed. Parsed without ``eval``. For models with a
class per instance, ``class == NAME`` and ``class != NAME`` compare the predicted class's name
(``"class == debris and area_px2 < 50"``; names with spaces in quotes: ``class == "class 1"``).
"""

from __future__ import annotations

import dataclasses
import operator
import re
from typing import Any, Sequence

import numpy as np

from .measure import MEASUREMENT_COLUMNS, MEASUREMENT_COLUMNS_3D, MEASUREMENT_COLUMNS_3D_UM, MEASUREMENT_COLUMNS_UM

_OPERATORS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge, "==": operator.eq,
              "!=": operator.ne}
_CONDITION = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*(<=|>=|==|!=|<|>)\s*"
                        r"([-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?)\s*")
_CLASS_CONDITION = re.compile(r"\s*(class)\s*(==|!=)\s*(?:\"([^\"]*)\"|'([^']*)'|([A-Za-z0-9_.+-]+))\s*")
CLASS_PROPERTY = "class"  # the name of the predicted class (models with a class head)


@dataclasses.dataclass(frozen=True)
class Condition:
    """``property op value``, e.g. ``npixels < 100``."""

    property: str
    op: str
    value: float | str  # a class name for the class property

    def holds(self, row: dict[str, Any]) -> bool:
        """Whether the row satisfies the condition (NaN satisfies only ``!=``)."""
        if isinstance(self.value, str):
            return bool(_OPERATORS[self.op](str(row[self.property]), self.value))
        return bool(_OPERATORS[self.op](float(row[self.property]), self.value))

    def __str__(self) -> str:
        return f"{self.property} {self.op} {self.value if isinstance(self.value, str) else format(self.value, 'g')}"


@dataclasses.dataclass(frozen=True)
class Rules:
    """Groups of conditions: a row matches when every condition of at least one group holds."""

    groups: tuple[tuple[Condition, ...], ...]

    def matches(self, row: dict[str, Any]) -> bool:
        return any(all(c.holds(row) for c in group) for group in self.groups)

    @property
    def properties(self) -> tuple[str, ...]:
        """The property names used, each once, in order of appearance."""
        return tuple(dict.fromkeys(c.property for group in self.groups for c in group))

    def __str__(self) -> str:
        return "; ".join(" and ".join(str(c) for c in group) for group in self.groups)


def parse_rules(text: str | Sequence[str], properties: Sequence[str] | None = None) -> Rules:
    """Parse ``"npixels < 100 and circularity <= 0.7; area > 5000"`` into :class:`Rules`.

    Groups are separated by ``;`` (or given as a list of strings) and OR-ed; the conditions
    of a group are joined by ``and`` and AND-ed. A condition is ``<property> <op> <number>``
    with op one of ``< <= > >= == !=``. No ``eval``: anything else is an error.

    Parameters
    ----------
    properties : the names allowed; by default the measurement columns of :func:`lib.instances.measure.measure`
        and :func:`lib.instances.measure.measure_3d`.

    Raises ``ValueError`` listing every malformed condition, empty group and unknown property
    (with the known ones).
    """
    known = tuple(dict.fromkeys(properties if properties is not None
                                else MEASUREMENT_COLUMNS + MEASUREMENT_COLUMNS_UM + MEASUREMENT_COLUMNS_3D
                                + MEASUREMENT_COLUMNS_3D_UM))
    if isinstance(text, str):
        parts = text.split(";")
    elif isinstance(text, Sequence) and all(isinstance(t, str) for t in text):
        parts = list(text)
    else:
        raise ValueError(f"rules must be a string or a list of strings; got {text!r}")
    if not any(p.strip() for p in parts):
        raise ValueError(f"rules must contain at least one condition such as 'npixels < 100'; got {text!r}")
    problems, groups = [], []
    for g, part in enumerate(parts, 1):
        if not part.strip():
            problems.append(f"group {g} must contain a condition; got an empty group in {text!r} "
                            f"(a doubled or trailing ';'?)")
            continue
        conditions = []
        for item in re.split(r"\band\b", part, flags=re.IGNORECASE):
            named = _CLASS_CONDITION.fullmatch(item)
            if named is not None:
                name = next(g for g in named.groups()[2:] if g is not None)
                conditions.append(Condition(CLASS_PROPERTY, named.group(2), name))
                continue
            match = _CONDITION.fullmatch(item)
            if match is None:
                problems.append(f"condition must be '<property> <op> <number>' with op one of "
                                f"{' '.join(_OPERATORS)}, or 'class == NAME' / 'class != NAME', joined by 'and' "
                                f"(groups by ';'); got {item.strip()!r}")
                continue
            name, op, value = match.groups()
            if name == CLASS_PROPERTY:
                problems.append(f"class compares names only: 'class == NAME' or 'class != NAME'; got {item.strip()!r}")
                continue
            if name not in known:
                problems.append(f"property must be one of {', '.join(known)}; got {name!r}")
                continue
            conditions.append(Condition(name, op, float(value)))
        groups.append(tuple(conditions))
    if problems:
        raise ValueError("invalid rules:\n" + "\n".join(f"  - {p}" for p in problems))
    return Rules(tuple(groups))


def filter_instances(labels: np.ndarray, rows: Sequence[dict[str, Any]], rules: Rules | str | Sequence[str],
                     action: str = "remove") -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Remove (or keep only) the instances whose measurement row matches the rules.

    Parameters
    ----------
    labels : integer labels of any shape, 0 = background.
    rows : one dict per instance present in ``labels`` (:func:`lib.instances.measure.measure` output), with a
        ``label`` key and every property the rules use.
    rules : :class:`Rules`, or text / list of strings for :func:`parse_rules`.
    action : ``"remove"`` the matching instances, or ``"keep"`` only them.

    Returns
    -------
    labels_kept : same shape and dtype; removed instances set to 0, the others keep their
        ids (not renumbered) so that they still match the rows.
    rows_with_status : copies of ``rows`` in the same order, each with ``"status"`` set to
        ``"kept"`` or ``"removed"``: a before/after table for a CSV.

    Raises ``ValueError`` for a bad action, rows without ``label`` or a used property,
    repeated labels, or rows that do not match the labels present (both lists given).
    """
    if action not in ("remove", "keep"):
        raise ValueError(f"action must be 'remove' or 'keep'; got {action!r}")
    if not isinstance(labels, np.ndarray) or labels.dtype.kind not in "iu":
        raise ValueError(f"labels must be an integer array; got {getattr(labels, 'dtype', type(labels).__name__)}")
    if not isinstance(rules, Rules):
        rules = parse_rules(rules)
    problems = []
    needed = ("label",) + rules.properties
    for i, row in enumerate(rows):
        missing = [name for name in needed if name not in row]
        if missing:
            problems.append(f"row {i} must have {', '.join(needed)}; missing {', '.join(missing)} "
                            f"(has {', '.join(map(str, row))})")
    if problems:
        raise ValueError("\n".join(problems))
    row_labels = [int(row["label"]) for row in rows]
    repeated = sorted({lab for lab in row_labels if row_labels.count(lab) > 1})
    present = np.unique(labels)
    present = set(present[present > 0].tolist())
    no_row = sorted(present - set(row_labels))
    no_object = sorted(set(row_labels) - present)
    if repeated:
        problems.append(f"rows must have one row per label; got repeated labels {_few(repeated)}")
    if no_row:
        problems.append(f"rows must have a row for every label in labels; missing rows for {_few(no_row)}")
    if no_object:
        problems.append(f"rows must describe labels present in labels; got rows for absent labels {_few(no_object)}")
    if problems:
        raise ValueError("rows do not match labels:\n" + "\n".join(f"  - {p}" for p in problems))
    out_rows, removed = [], []
    for row in rows:
        drop = rules.matches(row) == (action == "remove")
        out_rows.append({**row, "status": "removed" if drop else "kept"})
        if drop:
            removed.append(int(row["label"]))
    kept = labels.copy()
    if removed:
        kept[np.isin(labels, removed)] = 0
    return kept, out_rows


def _few(values: Sequence[int], limit: int = 10) -> str:
    shown = ", ".join(map(str, values[:limit]))
    return shown + (f", ... ({len(values)} in all)" if len(values) > limit else "")
