"""How long loading a packaged model takes: warm (converted cache present) and cold.

Cold means a fresh, empty ``MECHLIB_CACHE``: the GGUF's checksum (and assembly from its chunks),
the dequantization to a float32 Hugging Face folder, its manifest, and then the load. Warm is
the load alone, as in every notebook: with the cache's checksums verified (a process's first
load) and with its sizes only (later loads).

    python benchmarks/load_model.py [--model smollm2-135m|gemma3-270m] [--repeats N] [--no-cold]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="a packaged model (default smollm2-135m)")
    parser.add_argument("--repeats", type=int, default=1, help="warm loads to time (default 1)")
    parser.add_argument("--no-cold", action="store_true", help="skip the cold load (a full conversion)")
    args = parser.parse_args()

    t0 = time.perf_counter()
    import transformer_lens.model_bridge  # noqa: F401  (import cost, reported apart)

    import mechlib
    from mechlib import models

    threads = mechlib.set_threads()
    print(f"import mechlib + transformer_lens: {time.perf_counter() - t0:6.1f} s  ({threads} threads)")

    models.prepare_model(args.model, verbose=False)  # make sure the warm case really is warm
    models._HASHED.clear()
    t0 = time.perf_counter()
    models.prepare_model(args.model, verbose=False)
    print(f"cache check with checksums (first load in a process): {time.perf_counter() - t0:6.2f} s")
    t0 = time.perf_counter()
    models.prepare_model(args.model, verbose=False)
    print(f"cache check with sizes only (later loads):            {time.perf_counter() - t0:6.4f} s")
    warm = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        model = mechlib.load_model(args.model, verbose=False)
        warm.append(time.perf_counter() - t0)
        del model
    print(f"warm load of {args.model} (cache {models.cache_dir()}): {min(warm):6.1f} s  (best of {len(warm)})")
    if args.no_cold:
        return

    tmp = tempfile.mkdtemp(prefix="mechlib-bench-cache-")
    old = os.environ.get("MECHLIB_CACHE")
    os.environ["MECHLIB_CACHE"] = tmp
    try:
        t0 = time.perf_counter()
        models.prepare_model(args.model, verbose=False)
        convert = time.perf_counter() - t0
        mechlib.load_model(args.model, verbose=False)
        cold = time.perf_counter() - t0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is None:
            os.environ.pop("MECHLIB_CACHE", None)
        else:
            os.environ["MECHLIB_CACHE"] = old
    print(f"cold load (empty cache): {cold:6.1f} s  (of which checksum + conversion + manifest {convert:.1f} s)")


if __name__ == "__main__":
    main()
