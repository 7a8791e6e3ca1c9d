"""Ray job: K rounds in a row, then the report table and plot (throughput and quality per round).

    ray job submit --working-dir . -- python jobs/bench.py --rounds 3 --config jobs/configs/movielens.yaml
"""

import sys

from llmrec_ray.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    sys.exit(main(["-v", "run", *(args if "--rounds" in args else ["--rounds", "3", *args])]))  # -v: as jobs/round.py
