"""moe_probe.diagnose"""
