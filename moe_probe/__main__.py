from moe_probe.cli import main

raise SystemExit(main())
