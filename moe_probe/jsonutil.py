"""Strict JSON for the files and output moe_probe writes (torch-free: `info` and readers use it)."""

from __future__ import annotations

import math


def strict_json(obj):
    """NaN/inf -> None, so the output parses with strict JSON readers (jq, browsers)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj
