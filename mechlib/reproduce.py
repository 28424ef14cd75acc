"""``make reproduce``: execute every notebook on the default model and print the findings."""

from mechlib.runner import main

if __name__ == "__main__":
    raise SystemExit(main())
