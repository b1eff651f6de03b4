"""Executes the notebooks of a folder with the evcxr kernel ("rust"), in name order, and writes
the executed copies into an output folder. Fails (exit 1) on a cell error, on error output from
the kernel, and on a notebook without an inline image/png. Used by scripts/notebooks."""

import pathlib
import sys
import time

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError


def images(nb):
    return sum(
        1
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if "image/png" in out.get("data", {})
    )


def errors(nb):
    found = []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                found.append(f"{out.get('ename')}: {out.get('evalue')}")
            elif out.get("output_type") == "stream" and out.get("name") == "stderr":
                found.append(out.get("text", ""))
    return found


def main():
    src, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    failed = []
    for path in sorted(src.glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        start = time.time()
        client = NotebookClient(
            nb,
            kernel_name="rust",
            timeout=1800,
            resources={"metadata": {"path": str(src.resolve())}},
        )
        problem = None
        try:
            client.execute()
        except CellExecutionError as e:
            problem = str(e)
        nbformat.write(nb, out / path.name)
        problem = problem or "; ".join(errors(nb)) or None
        if problem is None and images(nb) == 0:
            problem = "no inline image/png output"
        took = time.time() - start
        if problem:
            failed.append(path.name)
            print(f"FAIL {path.name} ({took:.0f} s): {problem}", flush=True)
        else:
            print(f"ok   {path.name} ({took:.0f} s, {images(nb)} images)", flush=True)
    if failed:
        print(f"{len(failed)} notebook(s) failed: {', '.join(failed)}; executed copies in {out}")
        sys.exit(1)
    print(f"executed copies in {out}")


if __name__ == "__main__":
    main()
