"""What every ``scripts/make_nb_*.py`` shares: build a notebook's cells, write it without outputs."""

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


class Cells(list):
    """A notebook's cells, in order: ``md(text)``, ``code(text)``, then ``write(name)``."""

    def md(self, text: str) -> None:
        self.append(new_markdown_cell(text.strip()))

    def code(self, text: str) -> None:
        self.append(new_code_cell(text.strip()))

    def write(self, name: str) -> Path:
        """Write ``notebooks/<name>`` with stable cell ids, so regenerating changes nothing by itself."""
        nb = new_notebook(cells=list(self), metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})
        for i, cell in enumerate(nb.cells):
            cell.id = f"cell-{i:02d}"
        NOTEBOOKS.mkdir(exist_ok=True)
        out = NOTEBOOKS / name
        nbformat.write(nb, out)
        print(f"wrote {out}")
        return out
