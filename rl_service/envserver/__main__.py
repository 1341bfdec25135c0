"""`python -m rl_service.envserver`: serve a Gymnasium id over the environment protocol."""

from rl_service.envserver.cli import main

raise SystemExit(main())
