"""How long loading the default model takes: warm (converted cache present) and cold.

Cold means a fresh, empty ``MECHLIB_CACHE``: the GGUF's checksum, the dequantization to a
float32 Hugging Face folder, and then the load. Warm is the load alone, as in every notebook.

    python benchmarks/load_model.py [--repeats N]
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
    parser.add_argument("--repeats", type=int, default=1, help="warm loads to time (default 1)")
    args = parser.parse_args()

    t0 = time.perf_counter()
    import mechlib
    from mechlib.models import cache_dir, prepare_smollm2

    import transformer_lens.model_bridge  # noqa: F401  (import cost, reported apart)

    threads = mechlib.set_threads()
    print(f"import mechlib + transformer_lens: {time.perf_counter() - t0:6.1f} s  ({threads} threads)")

    prepare_smollm2(verbose=False)  # make sure the warm case really is warm
    warm = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        model = mechlib.load_model("smollm2-135m", verbose=False)
        warm.append(time.perf_counter() - t0)
        del model
    print(f"warm load (cache {cache_dir()}): {min(warm):6.1f} s  (best of {len(warm)})")

    tmp = tempfile.mkdtemp(prefix="mechlib-bench-cache-")
    old = os.environ.get("MECHLIB_CACHE")
    os.environ["MECHLIB_CACHE"] = tmp
    try:
        t0 = time.perf_counter()
        prepare_smollm2(verbose=False)
        convert = time.perf_counter() - t0
        mechlib.load_model("smollm2-135m", verbose=False)
        cold = time.perf_counter() - t0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is None:
            os.environ.pop("MECHLIB_CACHE", None)
        else:
            os.environ["MECHLIB_CACHE"] = old
    print(f"cold load (empty cache):          {cold:6.1f} s  (of which checksum + conversion {convert:.1f} s)")


if __name__ == "__main__":
    main()
