"""How a figure is drawn, chosen once: the one plotting-style object of maps and heatmaps.

``PlotStyle`` holds what a user may choose about a picture: the palette of a map's classes, its
point size and opacity, and the colour map of a heatmap. ``None`` means the figure's own default
(a map's size and opacity shrink as N grows; cam draws with ``jet``, attention with ``inferno``).
``featviz.maps.plotting`` and ``featviz.views.sheets`` read it; the CLI builds it from one option
set (``featviz.cli.options.plot_style``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from featviz.errors import DataError, did_you_mean


def colormap_names() -> list[str]:
    """The names matplotlib knows as colour maps (palettes are colour maps too: ``tab10``, ``Set2``)."""
    from matplotlib import colormaps

    return sorted(colormaps)


@dataclass(frozen=True)
class PlotStyle:
    """A figure's style; every field None = the figure's default.

    Args:
        palette: A matplotlib colour map for class colours (``tab10``, ``Set2``, ``viridis``); a
            qualitative one gives its colours in order, a continuous one evenly spaced colours.
        point_size: A map's marker size in pt² (default: by N).
        alpha: A map's marker opacity in (0, 1] (default: by N).
        cmap: A heatmap's colour map (``inferno``, ``jet``, ``viridis``).

    Raises:
        DataError: an unknown colour map name, a size ≤ 0 or an opacity outside (0, 1].
    """

    palette: str | None = None
    point_size: float | None = None
    alpha: float | None = None
    cmap: str | None = None

    def __post_init__(self) -> None:
        """Check every choice, so that a bad one fails before any work."""
        for option, name in (("--palette", self.palette), ("--cmap", self.cmap)):
            if name is not None and name not in set(colormap_names()):
                hint = did_you_mean(name, colormap_names())
                raise DataError(f"{option} {name!r} is not a matplotlib colour map{hint}; e.g. tab10, Set2, viridis, "
                                "inferno, jet")
        if self.point_size is not None and not self.point_size > 0:
            raise DataError(f"--point-size must be > 0 (pt²), got {self.point_size:g}")
        if self.alpha is not None and not 0 < self.alpha <= 1:
            raise DataError(f"--alpha must be in (0, 1], got {self.alpha:g}")

    def heat_cmap(self, default: str) -> str:
        """The heatmap colour map: the one chosen, else the figure's ``default``."""
        return self.cmap or default

    def with_defaults(self, **defaults: Any) -> PlotStyle:
        """This style with each field that is None taken from ``defaults``."""
        return replace(self, **{k: v for k, v in defaults.items() if getattr(self, k) is None})

    def to_dict(self) -> dict[str, Any]:
        """The style as a manifest records it (None = the figure's default)."""
        return asdict(self)


DEFAULT_STYLE = PlotStyle()
"""Every figure's own defaults."""
