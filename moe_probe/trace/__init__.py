"""moe_probe.trace"""
