"""``make reproduce``: execute every notebook (on each model of ``--models``), write ``reports/``
(findings, executed notebooks, ``index.html``) and, after a complete default run, the README's
findings section. Takes the same arguments as ``python -m mechlib.runner``."""

from mechlib.runner import main

if __name__ == "__main__":
    raise SystemExit(main(readme=True, prog="python -m mechlib.reproduce"))
