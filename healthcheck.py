"""Exit 0 when the service reports SERVING, 1 otherwise: `python healthcheck.py --address 127.0.0.1:50051`."""

import sys

from rl_service.healthcheck_main import main

if __name__ == "__main__":
    sys.exit(main())
