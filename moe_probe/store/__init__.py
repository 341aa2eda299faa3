"""moe_probe.store"""
