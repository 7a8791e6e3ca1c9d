"""Ray job: one incremental round: evaluate, train, gate, promote, commit.

    ray job submit --working-dir . -- python jobs/round.py --config jobs/configs/movielens.yaml [--set k=v ...]
"""

import sys

from llmrec_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["-v", "round", *sys.argv[1:]]))  # -v: Ray's and the libraries' logs go to the job's log
