"""moe_probe.reproduce: the paper's experiment at CPU scale."""
