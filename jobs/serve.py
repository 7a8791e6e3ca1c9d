"""Ray job: serve the promoted model with Ray Serve over HTTP.

    ray job submit --working-dir . -- python jobs/serve.py --config jobs/configs/movielens.yaml [--set k=v ...]
"""

import sys

from llmrec_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["-v", "serve", *sys.argv[1:]]))  # -v: Ray's and the libraries' logs go to the job's log
