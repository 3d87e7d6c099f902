"""Target specs for people: the planes grouped as a user names them (log lines), and the options of
a spec that change nothing for its channels (a warning at the command line)."""

from __future__ import annotations

from typing import Any

from .targets import TargetSpec, is_class_name
from .targets_embedding import is_embedding_name
from .targets_stardist import is_ray_name


def plane_groups(channels: tuple[str, ...]) -> list[tuple[str, list[int]]]:
    """The planes grouped as a user names them: ``R`` (every ray plane), ``E`` (the embedding planes),
    ``K`` (the class planes), each other plane alone; ``(name, plane indices)`` in plane order.
    For log lines: 32 ray planes read as one ``R``."""
    groups: list[tuple[str, list[int]]] = []
    for k, name in enumerate(channels):
        group = "R" if is_ray_name(name) else "E" if is_embedding_name(name) else "K" if is_class_name(name) else name
        if groups and groups[-1][0] == group and group in ("R", "E", "K"):
            groups[-1][1].append(k)
        else:
            groups.append((group, [k]))
    return groups


# The channels each option of TargetSpec shapes (an option set for none of them changes nothing).
OPTION_CHANNELS = {"contour_mode": ("C",), "point_radius": ("P",), "touch_width": ("T",),
                   "n_rays": ("R0",), "ray_grid": ("R0",), "d_alpha": ("D",), "d_beta": ("D",), "dn_scale": ("Dn",),
                   "distance_loss": ("Db", "H", "V", "D", "Dc", "Dn", "R0")}


def unused_options(spec: TargetSpec, options: dict[str, Any]) -> list[str]:
    """The options of ``options`` that differ from their defaults while ``spec`` has none of the
    channels they shape (``["n_rays"]`` for ``F,C,Db`` with ``n_rays=16``)."""
    defaults = TargetSpec()
    return [name for name, channels in OPTION_CHANNELS.items()
            if name in options and options[name] != getattr(defaults, name)
            and not any(c in spec.channels for c in channels)]


def describe_targets(spec: TargetSpec) -> str:
    """``"F (binary, weight 1), R: 32 planes (ray, weight 0.125 each)"``: the spec for a log line."""
    weights, parts = spec.loss_weights, []
    for name, planes in plane_groups(spec.channels):
        kind, weight = spec.kinds[planes[0]], weights[planes[0]]
        same = all(weights[k] == weight for k in planes)
        each = f"weight {weight:g}{' each' if len(planes) > 1 else ''}" if same else \
            "weights " + ",".join(f"{weights[k]:g}" for k in planes)
        parts.append(f"{name}: {len(planes)} planes ({kind}, {each})" if len(planes) > 1 else f"{name} ({kind}, {each})")
    return ", ".join(parts)
