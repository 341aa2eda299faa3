"""moe_probe.train"""
