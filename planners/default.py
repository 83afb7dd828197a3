"""nnU-Net v2's default experiment planner: 2d, 3d_fullres and, for large images, 3d_lowres."""

from autoseg.planning.planner import Planner, register_planner

register_planner("default")(Planner)
