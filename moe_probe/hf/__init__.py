"""moe_probe.hf"""
