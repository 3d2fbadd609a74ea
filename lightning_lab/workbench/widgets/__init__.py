"""Jupyter workbench: ``Dashboard(trainer)``, ``CreditPanel(state)``, ``TrajectoryInspector(batch)``.

The views need ipywidgets and a running kernel; without them they warn once and keep working as
plain objects (``Dashboard.run`` still trains). Figures and tables come from pure functions in
``figures``/``tables`` that tests and scripts call directly.
"""

from .dashboard import CreditPanel, Dashboard, TrajectoryInspector, widgets_available
from .figures import advantage_heatmaps, advantage_matrix, curves_figure, figure_png
from .tables import (CreditComparison, advantage_table, compare_credit, filter_trajectories,
                     last_user_message, trajectory_html, trajectory_label, transitions_frame)

__all__ = ["Dashboard", "CreditPanel", "TrajectoryInspector", "widgets_available",
           "curves_figure", "advantage_heatmaps", "advantage_matrix", "figure_png",
           "advantage_table", "compare_credit", "CreditComparison", "filter_trajectories",
           "trajectory_html", "trajectory_label", "transitions_frame", "last_user_message"]
