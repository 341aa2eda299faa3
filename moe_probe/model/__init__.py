"""moe_probe.model"""
