"""Start the RL training service: `python server.py --help` lists the flags; environment variables set the rest."""

import sys

from rl_service.server_main import main

if __name__ == "__main__":
    sys.exit(main())
