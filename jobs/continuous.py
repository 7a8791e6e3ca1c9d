"""Ray job: run rounds whenever new data lands (SIGTERM stops cleanly).

    ray job submit --working-dir . -- python jobs/continuous.py --config jobs/configs/movielens.yaml [--set k=v ...]
"""

import sys

from llmrec_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["-v", "continuous", *sys.argv[1:]]))  # -v: Ray's and the libraries' logs go to the job's log
