"""Ray job: import a data set into the store's interaction shards.

    ray job submit --working-dir . -- python jobs/import_data.py movielens --config jobs/configs/movielens.yaml
    ray job submit --working-dir . -- python jobs/import_data.py table --config jobs/examples/shop/table.yaml
    ray job submit --working-dir . -- python jobs/import_data.py table --interactions s3://bucket/events/ \
        --catalog s3://bucket/items.parquet --map user_id=customer ...      (README: Use your own data)
    (the data set defaults to the config's data.dataset)
"""

import sys

from llmrec_ray.cli import build_parser, config_from_args, main


def _argv(args: list[str]) -> list[str]:
    if args and not args[0].startswith("-"):
        return ["data", "import", *args]
    parsed = build_parser().parse_args(["round", *args])  # same --config/--set/--store options
    return ["data", "import", config_from_args(parsed).data.dataset, *args]


if __name__ == "__main__":
    sys.exit(main(_argv(sys.argv[1:])))
