"""Install the default model and texts into the cache: `python -m jobs.setup`."""
import json
import sys

from pipeline import assets


def main() -> int:
    try:
        print(json.dumps(assets.prepare_all(), indent=1))
    except assets.AssetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
