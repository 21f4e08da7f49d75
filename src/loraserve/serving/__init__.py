"""Serving loraserve past one process: `ray_app` runs replicas of the normal app under Ray Serve, with adapter
affinity (an optional extra: `pip install "ray[serve]"`). Nothing else in loraserve imports this package."""
