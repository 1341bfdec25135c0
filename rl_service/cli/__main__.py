"""`python -m rl_service.cli`: the same as the `rl-service` command."""

import sys

from rl_service.cli.main import main

sys.exit(main())
