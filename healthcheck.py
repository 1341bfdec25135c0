"""Exit 0 when the service reports SERVING, 1 when not serving or unreachable (the line printed says why), 2 on a
wrong command line: `python healthcheck.py --address 127.0.0.1:50051`."""

import sys

from rl_service.healthcheck_main import main

if __name__ == "__main__":
    sys.exit(main())
