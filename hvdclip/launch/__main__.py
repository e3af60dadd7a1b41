"""`python -m hvdclip.launch ...` is `hvdclip-run ...`."""

from hvdclip.launch.cli import main

raise SystemExit(main())
