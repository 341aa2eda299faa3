"""Figure builders of the pages: data path + plotly figures, no Dash (benchmarks call them).

Builders are plain functions of (root, run ids, labels, step range...); the pages call them
through the view registry (dashboards/views.py), which caches their figures."""
