"""Install the default model and texts into the cache: `python -m jobs.setup`.

Says what it does before each slow step (the GGUF conversion, the Debian download), then prints
where everything is, as JSON.
"""
import json
import sys

from pipeline import assets


def say(msg: str) -> None:
    print(f"      {msg}", flush=True)


def main() -> int:
    try:
        cache = assets.cache_dir()
        if not (cache / assets.MODEL_DIRNAME / "config.json").is_file():
            say(f"model: converting {assets.GGUF_NAME} to a float32 safetensors folder (once; about 30 s)")
        model = assets.default_model_dir()
        say(f"model: {model}")
        if not all((cache / "austen" / f"{b}.txt").is_file() for b in (assets.DEFAULT_CALIB, assets.DEFAULT_EVAL)):
            say(f"texts: apt-get download {assets.DEB_PACKAGE}, then extracting the six novels (once)")
        say(f"texts: {assets.austen(assets.DEFAULT_CALIB).parent}")
        print(json.dumps(assets.prepare_all(), indent=1))
    except assets.AssetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
