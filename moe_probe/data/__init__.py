"""moe_probe.data"""
